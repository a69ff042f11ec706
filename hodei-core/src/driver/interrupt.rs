/// Why a running body must stop.
#[derive(Debug)]
pub(super) enum Interrupt {
    /// The code does not match the journal.
    Nondeterminism(String),
    /// Cancellation was requested.
    Cancelled(String),
    /// The operation's branch was cancelled by its group's decision: the branch stops.
    BranchCancelled(String),
    /// The engine is shutting down; the saga resumes on the next start.
    Suspended,
    /// The journal could not be written.
    Storage(String),
}
