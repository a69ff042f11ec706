use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::control::Control;
use super::journal::Journal;
use crate::event::RecordedEvent;

/// An in-flight saga known to its engine: running, parked, or waiting for its version.
pub(crate) struct LiveSaga {
    pub journal: Arc<Journal>,
    pub control: Arc<Control>,
    pub finished: watch::Sender<Option<Arc<RecordedEvent>>>,
    pub task: Mutex<Option<tokio::task::AbortHandle>>,
}
