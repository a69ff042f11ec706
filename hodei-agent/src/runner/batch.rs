//! Reading one output pipe into masked, batched, backpressured [`LogBatch`]es.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prost::bytes::BufMut;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::error::RunnerError;
use super::mask::{MASK, Masker};
use super::{StopReason, StopSender};

/// Which output stream a batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    /// The job's standard output.
    Stdout,
    /// The job's standard error.
    Stderr,
}

/// A run of masked output bytes from one stream.
///
/// `offset` is the position of `data[0]` in that stream *after masking*: batches of a stream
/// arrive in order and tile it without gap or overlap (`next.offset == offset + data.len()`),
/// the first at 0, and the stream's total is [`JobResult::stdout_bytes`] or
/// [`JobResult::stderr_bytes`]. Offsets after masking are the only ones a receiver can check,
/// since it never sees the raw bytes.
///
/// [`JobResult::stdout_bytes`]: super::JobResult::stdout_bytes
/// [`JobResult::stderr_bytes`]: super::JobResult::stderr_bytes
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    /// The stream.
    pub stream: Stream,
    /// The masked-stream offset of the first byte.
    pub offset: u64,
    /// The bytes: one contiguous buffer, not necessarily UTF-8, possibly cut inside a line or a
    /// multi-byte character.
    pub data: Vec<u8>,
}

impl fmt::Debug for LogBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogBatch")
            .field("stream", &self.stream)
            .field("offset", &self.offset)
            .field("len", &self.data.len())
            .finish()
    }
}

/// When a batch is sent: as soon as it holds `max_bytes`, or `max_delay` after its first byte,
/// whichever comes first.
///
/// The defaults, 64 KiB or 200 ms, sit between Woodpecker's 1 MiB / 1 s and GitHub's 100 lines /
/// 500 ms. 64 KiB is the default Linux pipe capacity, so a fast writer fills about one batch per
/// read and one message per pipe-full, while a job's buffered output stays small (a 1 MiB batch
/// per stream per job would dominate the agent's memory with a few jobs and a slow link). Bytes
/// rather than lines because lines have no size bound and finding them costs a pass over every
/// byte. 200 ms keeps a live log feeling live (below the ~250 ms where a delay is noticed; 1 s is
/// visibly laggy) while capping a trickling job at five messages a second per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchLimits {
    /// The most bytes in one batch (at least 1 is used).
    pub max_bytes: usize,
    /// The longest a byte waits in a partial batch (at most an hour is used).
    pub max_delay: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self { max_bytes: 64 * 1024, max_delay: Duration::from_millis(200) }
    }
}

/// The most read from a pipe at once: the default pipe capacity, so one read empties a full pipe.
const READ_CHUNK: usize = 64 * 1024;

impl BatchLimits {
    pub(crate) fn max_bytes(&self) -> usize {
        self.max_bytes.max(1)
    }

    /// Longer delays are treated as an hour, which is never for a log and cannot overflow a
    /// deadline.
    fn max_delay(&self) -> Duration {
        self.max_delay.min(Duration::from_secs(3600))
    }

    fn read_size(&self) -> usize {
        self.max_bytes().min(READ_CHUNK)
    }

    /// The most output bytes one stream's pump holds at any time.
    ///
    /// A partial batch is under `max_bytes`; one read adds at most `read_size` bytes plus the
    /// held-back masker tail (under the longest pattern), and masking at most multiplies a byte
    /// count by `MASK.len()` (a one-byte secret becomes `***`). Full batches are sent before the
    /// next read, and the pump waits for the sink while it holds them, so this is all.
    pub(crate) fn held_bound(&self, max_pattern_len: usize) -> usize {
        self.max_bytes() + MASK.len() * (self.read_size() + max_pattern_len)
    }
}

/// Output bytes held inside the runner for one job: read from the pipes but not yet accepted by
/// the sink.
#[derive(Debug, Default)]
pub(crate) struct BufferGauge {
    held: AtomicUsize,
    peak: AtomicUsize,
}

impl BufferGauge {
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

/// One pump's share of the gauge.
struct Held {
    gauge: Arc<BufferGauge>,
    mine: usize,
}

impl Held {
    fn set(&mut self, now: usize) {
        if now > self.mine {
            let grow = now - self.mine;
            let total = self.gauge.held.fetch_add(grow, Ordering::Relaxed) + grow;
            self.gauge.peak.fetch_max(total, Ordering::Relaxed);
        } else {
            self.gauge.held.fetch_sub(self.mine - now, Ordering::Relaxed);
        }
        self.mine = now;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// What a pump reports when its stream has ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PumpReport {
    /// Masked bytes accepted by the sink.
    pub(crate) bytes: u64,
    /// The pump stopped at the drain deadline while the pipe was still open.
    pub(crate) left_open: bool,
}

/// Everything one pump needs.
pub(crate) struct Pump {
    pub(crate) stream: Stream,
    pub(crate) limits: BatchLimits,
    pub(crate) masker: Masker,
    pub(crate) sink: mpsc::Sender<LogBatch>,
    pub(crate) gauge: Arc<BufferGauge>,
    /// Turns true at the drain deadline.
    pub(crate) drain_deadline: watch::Receiver<bool>,
    pub(crate) stop: StopSender,
}

enum Event {
    Read(std::io::Result<usize>),
    Timer,
    Deadline,
}

/// Why a pump stopped sending.
struct SinkClosed;

impl Pump {
    /// Reads `reader` to its end (or to the drain deadline) and sends it on as batches.
    ///
    /// Backpressure comes from awaiting the sink before reading again: while the sink is full
    /// nothing is read, the pipe fills, and the job blocks in `write`.
    pub(crate) async fn run<R: AsyncRead + Unpin>(
        mut self,
        mut reader: R,
    ) -> Result<PumpReport, RunnerError> {
        let mut out = Outbox {
            stream: self.stream,
            offset: 0,
            data: Vec::new(),
            max_bytes: self.limits.max_bytes(),
            deadline: None,
            sink: self.sink.clone(),
            held: Held { gauge: Arc::clone(&self.gauge), mine: 0 },
        };
        let max_delay = self.limits.max_delay();
        // Without secrets the output is the input: it is read straight into the batch instead
        // of into `buf` and copied from there by the masker.
        let direct = self.masker.max_pattern_len() == 0;
        let mut buf = vec![0u8; if direct { 0 } else { self.limits.read_size() }];
        let read_size = self.limits.read_size();
        let mut flooding = false;
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut left_open = false;
        loop {
            // Biased: ready bytes are always read before a timer flush or the drain deadline, so
            // the deadline only ever cuts off a pipe that is open but idle.
            let event = tokio::select! {
                biased;
                r = read_chunk(&mut reader, &mut buf, direct.then_some((&mut out, read_size, flooding))) => {
                    Event::Read(r)
                }
                () = &mut timer, if out.deadline.is_some() => Event::Timer,
                _ = self.drain_deadline.wait_for(|cut| *cut) => Event::Deadline,
            };
            let sent = match event {
                Event::Read(Ok(0)) => break,
                Event::Read(Ok(n)) => {
                    flooding = n >= read_size.min(out.max_bytes);
                    if !direct {
                        if flooding {
                            out.reserve_batch(n);
                        }
                        self.masker.feed(&buf[..n], &mut out.data);
                    }
                    out.held.set(self.masker.pending_len() + out.data.len());
                    out.send_full(self.masker.pending_len()).await
                }
                Event::Read(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Event::Read(Err(source)) => {
                    self.stop.request(StopReason::OutputFailed);
                    let context = match self.stream {
                        Stream::Stdout => "reading the job's stdout",
                        Stream::Stderr => "reading the job's stderr",
                    };
                    return Err(RunnerError::Io { context, source });
                }
                Event::Timer => out.send_all(self.masker.pending_len()).await,
                Event::Deadline => {
                    left_open = true;
                    break;
                }
            };
            if sent.is_err() {
                return Ok(self.sink_closed(out.offset));
            }
            let now = Instant::now();
            if out.deadline.is_none() && !out.data.is_empty() {
                // The timer is armed when a batch gets its first byte, never polled.
                let at = now + max_delay;
                out.deadline = Some(at);
                timer.as_mut().reset(at);
            }
            // A trickle of reads that are always ready would starve the timer branch.
            let overdue = out.deadline.is_some_and(|at| now >= at);
            if overdue && out.send_all(self.masker.pending_len()).await.is_err() {
                return Ok(self.sink_closed(out.offset));
            }
        }
        self.masker.finish(&mut out.data);
        out.held.set(out.data.len());
        if out.send_all(0).await.is_err() {
            return Ok(self.sink_closed(out.offset));
        }
        Ok(PumpReport { bytes: out.offset, left_open })
    }

    /// Nobody can receive the output any more: the job is stopped rather than run blind.
    fn sink_closed(&self, bytes: u64) -> PumpReport {
        self.stop.request(StopReason::SinkClosed);
        PumpReport { bytes, left_open: false }
    }
}

/// Reads the next chunk of output: into `buf` for the masker, or with `direct` (the batch, the
/// read size, whether the last read was full) straight into the batch, at most up to its size
/// so that a full batch leaves no remainder to copy out.
async fn read_chunk<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    direct: Option<(&mut Outbox, usize, bool)>,
) -> std::io::Result<usize> {
    let Some((out, read_size, flooding)) = direct else { return reader.read(buf).await };
    let room = out.max_bytes.saturating_sub(out.data.len()).clamp(1, read_size);
    if flooding {
        out.reserve_batch(room);
    } else {
        out.data.reserve(room);
    }
    reader.read_buf(&mut (&mut out.data).limit(room)).await
}

/// The batch being filled, and the stream offset it starts at.
struct Outbox {
    stream: Stream,
    offset: u64,
    data: Vec<u8>,
    max_bytes: usize,
    /// When the partial batch is due; `None` while there is none.
    deadline: Option<Instant>,
    sink: mpsc::Sender<LogBatch>,
    held: Held,
}

impl Outbox {
    /// Sizes the batch for all of a flood at once (`more` bytes coming now, more after), so
    /// that it is not copied again each time it would double.
    fn reserve_batch(&mut self, more: usize) {
        self.data.reserve(self.max_bytes.saturating_sub(self.data.len()).max(more));
    }

    /// Sends every full batch, leaving the partial remainder.
    async fn send_full(&mut self, pending: usize) -> Result<(), SinkClosed> {
        while self.data.len() >= self.max_bytes {
            // The remainder is copied out (it is at most a few reads long) so that the full
            // batch keeps its buffer and goes out without another copy.
            let rest = self.data[self.max_bytes..].to_vec();
            self.data.truncate(self.max_bytes);
            let full = std::mem::replace(&mut self.data, rest);
            self.send(full, pending).await?;
        }
        Ok(())
    }

    /// Sends everything in the outbox, in full batches and a last partial one.
    async fn send_all(&mut self, pending: usize) -> Result<(), SinkClosed> {
        self.send_full(pending).await?;
        if !self.data.is_empty() {
            let last = std::mem::take(&mut self.data);
            self.send(last, pending).await?;
        }
        Ok(())
    }

    async fn send(&mut self, data: Vec<u8>, pending: usize) -> Result<(), SinkClosed> {
        let len = data.len();
        // The batch stays counted while the sink makes us wait: it is still the runner's memory.
        self.sink
            .send(LogBatch { stream: self.stream, offset: self.offset, data })
            .await
            .map_err(|_| SinkClosed)?;
        self.offset += len as u64;
        // Whatever is left is a new batch, due from when the pump next looks at it.
        self.deadline = None;
        self.held.set(pending + self.data.len());
        Ok(())
    }
}
