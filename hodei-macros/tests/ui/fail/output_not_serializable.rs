use hodei::{StepContext, StepError, step};

struct Handle;

#[step]
async fn open(_ctx: StepContext) -> Result<Handle, StepError> {
    Ok(Handle)
}

fn main() {}
