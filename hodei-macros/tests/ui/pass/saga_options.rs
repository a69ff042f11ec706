// #[saga] with its options, and without an input.
use hodei::{SagaContext, StepError, saga};

#[saga(name = "release-train", version = 3)]
async fn release(_ctx: SagaContext, version: String) -> Result<String, StepError> {
    Ok(version)
}

#[saga]
async fn no_input(_ctx: SagaContext) -> Result<(), StepError> {
    Ok(())
}

fn main() {
    assert_eq!((release::NAME, release::VERSION), ("release-train", 3));
    assert_eq!((no_input::NAME, no_input::VERSION), ("no_input", 1));
    let _ = release::definition();
}

// A parameter, or a local, may share the saga's name: the generated type must not capture it.
#[saga]
async fn deploy(_ctx: SagaContext, deploy: String) -> Result<usize, StepError> {
    let len = deploy.len();
    Ok(len)
}
