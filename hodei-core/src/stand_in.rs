//! Stand-ins: bodies a test registers by step name to run instead of the steps' own, so that a
//! saga whose steps reach the outside world runs in a test with the same code and journal.

use std::any::{Any, type_name};
use std::collections::HashMap;
use std::sync::Arc;

use crate::driver::BoxFuture;
use crate::retry::StepError;
use crate::step_context::StepContext;

/// A stand-in's body, for a step that takes `I` and returns `O`.
pub(crate) type StandInBody<I, O> = dyn Fn(StepContext, I) -> BoxFuture<Result<O, StepError>> + Send + Sync;

/// The stand-ins of one engine, by step name. Registered as one of the engine's resources:
/// an engine without any has none, and its steps pay one map lookup.
#[derive(Default)]
pub(crate) struct StandIns(HashMap<String, StandIn>);

struct StandIn {
    /// The types it was registered with, for the error when they do not fit.
    input: &'static str,
    output: &'static str,
    /// An `Arc<StandInBody<I, O>>` for the types above.
    body: Box<dyn Any + Send + Sync>,
}

impl StandIns {
    /// Registers `body` for every step named `step`; a second one for one name replaces the
    /// first, as a test that overrides a shared set-up expects.
    #[cfg_attr(not(any(feature = "testing", test)), allow(dead_code))]
    pub fn insert<I: 'static, O: 'static>(&mut self, step: String, body: Arc<StandInBody<I, O>>) {
        let stand_in = StandIn { input: type_name::<I>(), output: type_name::<O>(), body: Box::new(body) };
        self.0.insert(step, stand_in);
    }

    /// The stand-in for the step `step`, which takes `I` and returns `O`. `Err` says why the
    /// stand-in registered under its name does not fit it: a stand-in of other types would
    /// hand the saga a value its code cannot have come from the step.
    pub fn find<I: 'static, O: 'static>(&self, step: &str) -> Option<Result<Arc<StandInBody<I, O>>, String>> {
        let stand_in = self.0.get(step)?;
        let body = stand_in.body.downcast_ref::<Arc<StandInBody<I, O>>>().cloned();
        Some(body.ok_or_else(|| {
            format!(
                "the stand-in for step `{step}` takes `{}` and returns `{}`, but the step takes `{}` and returns `{}`",
                stand_in.input,
                stand_in.output,
                type_name::<I>(),
                type_name::<O>()
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stand_in_is_found_only_for_the_types_it_was_registered_with() {
        let mut stand_ins = StandIns::default();
        let body: Arc<StandInBody<String, u32>> =
            Arc::new(|_, input: String| Box::pin(async move { Ok(input.len() as u32) }));
        stand_ins.insert("measure".into(), body);
        assert!(stand_ins.find::<String, u32>("measure").is_some_and(|found| found.is_ok()));
        assert!(stand_ins.find::<String, u32>("other").is_none(), "no stand-in for another name");
        let Some(Err(reason)) = stand_ins.find::<String, String>("measure") else {
            panic!("a stand-in returning u32 must not fit a step returning String");
        };
        assert_eq!(
            reason,
            "the stand-in for step `measure` takes `alloc::string::String` and returns `u32`, \
             but the step takes `alloc::string::String` and returns `alloc::string::String`"
        );
    }
}
