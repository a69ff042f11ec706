//! Running one saga: the journal writer, step execution with durable retries, replay, and the
//! compensation phase.
//!
//! A driver task owns a saga while it runs. It replays the body from the start: every step the
//! journal records returns its recorded result, and the first step it does not record runs
//! live. Anything that must stop the body (nondeterminism, cancellation, shutdown, a storage
//! failure) is an [`Interrupt`](interrupt::Interrupt): the step that finds it reports it and
//! never returns, and the driver drops the body, so the wrong code can never run.
//!
//! The driver knows nothing of the engine that starts it or of the saga-writing API on top of
//! it: the engine lends it a [`Host`] and the body to run, and the API reaches it through
//! [`SagaShared`].

mod attempt;
mod check;
mod compensation;
mod control;
mod ending;
mod group;
mod host;
mod interrupt;
mod journal;
mod lifecycle;
mod live;
mod observed;
mod patch;
mod probe;
mod scope;
mod shared;
mod signal;
mod spec;
mod step;
mod timer;

pub(crate) use check::check;
pub(crate) use control::Control;
pub(crate) use ending::final_status;
pub(crate) use host::Host;
pub(crate) use journal::{Halt, Journal};
pub(crate) use lifecycle::drive;
pub(crate) use live::LiveSaga;
pub(crate) use scope::Scope;
pub(crate) use shared::SagaShared;
pub(crate) use spec::{
    BoxFuture, CompensationSpec, ErasedCompensation, RawCompensation, StepOptions, StepSpec,
};
