// A step is only callable with a saga's context: outside a saga there is none to pass.
use hodei::{StepContext, StepError, step};

#[step]
async fn build(_ctx: StepContext, target: String) -> Result<String, StepError> {
    Ok(target)
}

async fn not_a_saga() {
    let _ = build("x86_64".to_string()).await;
}

fn main() {
    let _ = not_a_saga();
}
