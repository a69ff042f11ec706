/// The static shape of a saga, as `#[saga]` reads it from the body: its step calls in the
/// order they appear, each with its compensation. For docs and dashboards; the engine itself
/// runs on the journal, never on the shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SagaShape {
    /// The definition name.
    pub name: &'static str,
    /// The definition version.
    pub version: u32,
    /// The step calls, in source order.
    pub steps: &'static [StepShape],
}

/// One step call in a [`SagaShape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StepShape {
    /// The step's name.
    pub name: &'static str,
    /// The path of its compensation, as written.
    pub compensation: Option<&'static str>,
}

impl SagaShape {
    #[doc(hidden)]
    pub const fn new(name: &'static str, version: u32, steps: &'static [StepShape]) -> Self {
        Self { name, version, steps }
    }

    /// Whether no two steps share a name. Checked at compile time by `#[saga]`.
    pub const fn has_unique_step_names(&self) -> bool {
        let mut i = 0;
        while i < self.steps.len() {
            let mut j = i + 1;
            while j < self.steps.len() {
                if const_str_eq(self.steps[i].name, self.steps[j].name) {
                    return false;
                }
                j += 1;
            }
            i += 1;
        }
        true
    }
}

impl StepShape {
    #[doc(hidden)]
    pub const fn new(name: &'static str, compensation: Option<&'static str>) -> Self {
        Self { name, compensation }
    }
}

const fn const_str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
