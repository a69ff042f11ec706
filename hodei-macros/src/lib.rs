//! `#[saga]` and `#[step]`: durable, compensating sagas written as plain async functions.
//!
//! Use them through the `hodei` crate, which re-exports them and documents them with runnable
//! examples. The generated code calls `hodei::__private` through absolute paths, so it does not
//! depend on the caller's imports; `crate = "path"` points it elsewhere (a renamed dependency,
//! or `hodei_core` used directly).
//!
//! ```
//! use hodei::{Engine, MemoryStore, Outcome, SagaContext, StepContext, StepError, saga, step};
//!
//! #[step(retry(max_attempts = 2, backoff = "1ms"))]
//! async fn double(_ctx: StepContext, n: u32) -> Result<u32, StepError> {
//!     Ok(n * 2)
//! }
//!
//! #[saga(name = "doubler", version = 1)]
//! async fn doubler(ctx: SagaContext, n: u32) -> Result<u32, StepError> {
//!     double(&ctx, n).await
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), hodei::Error> {
//! let engine = Engine::builder().store(MemoryStore::new()).register(doubler::definition()).start().await?;
//! let run = doubler::start(&engine, "d-1", &21).await?;
//! assert_eq!(run.outcome().await?, Outcome::Completed(42));
//! assert_eq!(doubler::SHAPE.steps[0].name, "double");
//! # Ok(()) }
//! ```
//!
//! `attr.rs` parses and checks the input; `expand.rs` generates the code. On any error the
//! original item is still emitted beside the errors, so IDEs keep working.

mod attr;
mod expand;

use proc_macro::TokenStream;

/// Makes an `async fn(ctx: StepContext, inputs...) -> Result<T, E>` a journaled step.
///
/// The generated function takes `&SagaContext` in place of the step context, so a step can
/// only be called from a saga: calling it without one is a compile error. Options: `name =
/// "..."`, `compensate = path::to_fn`, `retry(max_attempts = 3, backoff = "1s", max_backoff =
/// "1m", multiplier = 2.0, jitter = 0.2)`, `timeout = "30s"`, `crate = "path"`.
#[proc_macro_attribute]
pub fn step(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::step(args.into(), item.into()).into()
}

/// Makes an `async fn(ctx: SagaContext, input: I) -> Result<O, E>` a saga definition: a unit
/// type of the same name with `definition()`, `start(&engine, id, &input)` and `SHAPE`.
/// Options: `name = "..."`, `version = 1`, `crate = "path"`.
#[proc_macro_attribute]
pub fn saga(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::saga(args.into(), item.into()).into()
}
