// The generated code reaches hodei through `crate = "..."`, not through the user's imports:
// nothing named `hodei` is in scope here.
extern crate hodei as renamed;

use renamed::{SagaContext, StepContext, StepError};

#[renamed::step(crate = "::renamed")]
async fn work(_ctx: StepContext) -> std::result::Result<u8, StepError> {
    Ok(1)
}

#[renamed::saga(crate = "::renamed")]
async fn job(ctx: SagaContext, _: ()) -> std::result::Result<u8, StepError> {
    work(&ctx).await
}

// Names the generated code must not pick up from the caller's scope.
#[allow(non_snake_case)]
mod Result {}
mod core {}

fn main() {
    let _ = job::definition();
}
