/// A step, by number and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRef {
    /// The step number.
    pub index: u32,
    /// The step name.
    pub name: String,
}

/// How a saga ended.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Outcome<O> {
    /// The body returned this output.
    Completed(O),
    /// The saga failed (or was cancelled) and every compensation succeeded.
    Compensated {
        /// Why it failed.
        cause: String,
    },
    /// A compensation failed for good. An operator must finish what is listed in `undone`.
    CompensationFailed {
        /// The step whose compensation failed.
        step: StepRef,
        /// Its error.
        error: String,
        /// The compensations that did not run, the failed one first, in the order they were due.
        undone: Vec<StepRef>,
    },
    /// The saga failed and had nothing to compensate.
    Failed {
        /// Why.
        cause: String,
    },
}
