//! Stand-ins: bodies and compensations a test registers by step name to run instead of the
//! steps' own, so that a saga whose steps reach the outside world runs in a test with the same
//! code and journal.

use std::any::{Any, type_name};
use std::collections::HashMap;
use std::sync::Arc;

use crate::driver::BoxFuture;
use crate::retry::StepError;
use crate::saga::CompensationContext;
use crate::step_context::StepContext;

/// A stand-in's body, for a step that takes `I` and returns `O`.
pub(crate) type StandInBody<I, O> = dyn Fn(StepContext, I) -> BoxFuture<Result<O, StepError>> + Send + Sync;

/// A stand-in's compensation, for a step that takes `I` and returns `O`.
pub(crate) type StandInCompensation<I, O> =
    dyn Fn(CompensationContext<I, O>) -> BoxFuture<Result<(), StepError>> + Send + Sync;

/// The stand-ins of one engine, by step name. Registered as one of the engine's resources:
/// an engine without any has none, and its steps pay one map lookup.
#[derive(Default)]
pub(crate) struct StandIns {
    bodies: HashMap<String, StandIn>,
    compensations: HashMap<String, StandIn>,
}

struct StandIn {
    /// The step types it was registered for, for the error when they do not fit.
    input: &'static str,
    output: &'static str,
    /// An `Arc<StandInBody<I, O>>` or an `Arc<StandInCompensation<I, O>>` for those types.
    run: Box<dyn Any + Send + Sync>,
}

impl StandIn {
    fn new<I, O, T: Send + Sync + ?Sized + 'static>(run: Arc<T>) -> Self {
        Self { input: type_name::<I>(), output: type_name::<O>(), run: Box::new(run) }
    }

    /// The stand-in as a `T`, for the step `step` of types `I` and `O`; `Err` says why it does
    /// not fit: a stand-in of other types would hand the saga a value its code cannot have had.
    fn fitting<I, O, T: ?Sized + 'static>(&self, what: &str, step: &str) -> Result<Arc<T>, String> {
        self.run.downcast_ref::<Arc<T>>().cloned().ok_or_else(|| {
            format!(
                "the stand-in {what} for step `{step}` takes `{}` and returns `{}`, but the step takes `{}` and returns `{}`",
                self.input,
                self.output,
                type_name::<I>(),
                type_name::<O>()
            )
        })
    }
}

impl StandIns {
    /// Registers `body` for every step named `step`; a second one for one name replaces the
    /// first, as a test that overrides a shared set-up expects.
    #[cfg_attr(not(any(feature = "testing", test)), allow(dead_code))]
    pub fn insert_body<I: 'static, O: 'static>(&mut self, step: String, body: Arc<StandInBody<I, O>>) {
        self.bodies.insert(step, StandIn::new::<I, O, _>(body));
    }

    /// Registers `compensation` for every step named `step`, in place of the step's own.
    #[cfg_attr(not(any(feature = "testing", test)), allow(dead_code))]
    pub fn insert_compensation<I: 'static, O: 'static>(
        &mut self,
        step: String,
        compensation: Arc<StandInCompensation<I, O>>,
    ) {
        self.compensations.insert(step, StandIn::new::<I, O, _>(compensation));
    }

    /// The stand-in body for the step `step`, which takes `I` and returns `O`.
    pub fn body<I: 'static, O: 'static>(&self, step: &str) -> Option<Result<Arc<StandInBody<I, O>>, String>> {
        Some(self.bodies.get(step)?.fitting::<I, O, _>("body", step))
    }

    /// The stand-in compensation for the step `step`, which takes `I` and returns `O`.
    pub fn compensation<I: 'static, O: 'static>(
        &self,
        step: &str,
    ) -> Option<Result<Arc<StandInCompensation<I, O>>, String>> {
        Some(self.compensations.get(step)?.fitting::<I, O, _>("compensation", step))
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
        stand_ins.insert_body("measure".into(), body);
        assert!(stand_ins.body::<String, u32>("measure").is_some_and(|found| found.is_ok()));
        assert!(stand_ins.body::<String, u32>("other").is_none(), "no stand-in for another name");
        assert!(stand_ins.compensation::<String, u32>("measure").is_none(), "a body is not a compensation");
        let Some(Err(reason)) = stand_ins.body::<String, String>("measure") else {
            panic!("a stand-in returning u32 must not fit a step returning String");
        };
        assert_eq!(
            reason,
            "the stand-in body for step `measure` takes `alloc::string::String` and returns `u32`, \
             but the step takes `alloc::string::String` and returns `alloc::string::String`"
        );
    }
}
