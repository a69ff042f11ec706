use hodei::{CompensationContext, StepContext, StepError, step};

#[step(compensate = undo)]
async fn deploy(_ctx: StepContext, image: String) -> Result<u64, StepError> {
    Ok(image.len() as u64)
}

// Takes the wrong input type: the step's input is a String.
async fn undo(_c: CompensationContext<u32, u64>) -> Result<(), StepError> {
    Ok(())
}

fn main() {}
