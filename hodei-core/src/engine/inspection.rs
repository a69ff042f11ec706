use tokio::sync::broadcast;

use super::filter::{Page, SagaFilter};
use super::registry::DefinitionInfo;
use super::state::Engine;
use crate::bus::EngineEvent;
use crate::error::{Error, Result};
use crate::event::{RecordedEvent, SagaId, SagaRecord};

impl Engine {
    /// The saga's summary record, with its current status.
    pub fn status(&self, id: &SagaId) -> Result<SagaRecord> {
        if let Some(live) = self.inner.live(id) {
            return Ok(live.journal.record());
        }
        self.inner.store.record(id)?.ok_or_else(|| Error::SagaNotFound(id.clone()))
    }

    /// The sagas that match the filter, in id order.
    pub fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaRecord>> {
        let mut records = self.inner.store.records()?;
        records.retain(|r| filter.matches(r));
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    /// One page of the sagas that match the filter, in id order: those after `after` (from the
    /// first without it), at most `limit` of them (at least one is asked for). Pass the page's
    /// `next` as `after` for the next page; `next` is `None` on the last page.
    ///
    /// The store scans its records from the cursor and stops once the page is full, so a page
    /// costs what it reads, not the size of the store: unlike [`list`](Self::list), this holds
    /// for any number of runs. A saga started or removed while one pages through appears or
    /// not, as its id falls before or after the cursor; none appears twice.
    pub fn list_page(&self, filter: &SagaFilter, after: Option<&SagaId>, limit: usize) -> Result<Page> {
        let limit = limit.max(1);
        // One more than the page, to tell the last page without a second, empty, request.
        let mut records =
            self.inner.store.records_after(after, limit.saturating_add(1), &|r| filter.matches(r))?;
        let next = if records.len() > limit {
            records.truncate(limit);
            records.last().map(|r| r.id.clone())
        } else {
            None
        };
        Ok(Page { records, next })
    }

    /// Every registered definition, by name then version: what runs can be started as.
    pub fn definitions(&self) -> Vec<DefinitionInfo> {
        self.inner.registry.all()
    }

    /// Whether a journaled input of `definition` and a new one hold the same value of its
    /// input type; byte equality for a definition not registered here, whose type is unknown.
    pub(crate) fn same_input(
        &self,
        definition: &str,
        version: Option<u32>,
        recorded: &[u8],
        new: &[u8],
    ) -> Result<bool, String> {
        match self.inner.registry.get(definition, version) {
            Some(definition) => (definition.input.same)(recorded, new),
            None => Ok(recorded == new),
        }
    }

    /// The saga's whole journal, with timestamps.
    pub fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        let history = self.inner.store.history(id)?;
        if history.is_empty() {
            return Err(Error::SagaNotFound(id.clone()));
        }
        Ok(history)
    }

    /// Everything the engine journals and every status change, as it happens. A subscriber
    /// that falls more than [`EngineConfig::event_buffer`](crate::EngineConfig::event_buffer) events behind gets
    /// `RecvError::Lagged` and can catch up from [`history`](Self::history).
    pub fn subscribe(&self) -> broadcast::Receiver<EngineEvent> {
        self.inner.bus.subscribe()
    }
}

/// Listing with filters and cursor pagination at 100,000 runs: pages cover every matching run
/// once, in id order, and a page never loads the whole store.
#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::error::Result;
    use crate::event::{Event, RecordedEvent, SagaId, SagaRecord, SagaStatus, Timestamp};
    use crate::store::{Durable, EventStore, MemoryStore};
    use crate::{Engine, SagaFilter};

    /// A store that counts the calls that read every record, which a page must never make.
    #[derive(Debug, Default)]
    struct Counting {
        inner: MemoryStore,
        full_reads: AtomicUsize,
    }

    impl EventStore for Counting {
        fn create(&self, record: &SagaRecord, first: &RecordedEvent) -> Result<Option<SagaRecord>> {
            self.inner.create(record, first)
        }
        fn append(&self, id: &SagaId, events: &[RecordedEvent], record: Option<&SagaRecord>) -> Result<()> {
            self.inner.append(id, events, record)
        }
        fn durable(&self) -> Durable {
            self.inner.durable()
        }
        fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
            self.inner.history(id)
        }
        fn record(&self, id: &SagaId) -> Result<Option<SagaRecord>> {
            self.inner.record(id)
        }
        fn in_flight(&self) -> Result<Vec<SagaRecord>> {
            self.inner.in_flight()
        }
        fn records(&self) -> Result<Vec<SagaRecord>> {
            self.full_reads.fetch_add(1, Ordering::SeqCst);
            self.inner.records()
        }
        fn records_after(
            &self,
            after: Option<&SagaId>,
            limit: usize,
            keep: &dyn Fn(&SagaRecord) -> bool,
        ) -> Result<Vec<SagaRecord>> {
            self.inner.records_after(after, limit, keep)
        }
        fn remove(&self, id: &SagaId) -> Result<()> {
            self.inner.remove(id)
        }
    }

    const RUNS: u32 = 100_000;

    /// Run `i`: definition `build` or `deploy`, versions 1 to 3, created at `i`, every seventh
    /// still running; ids numbered so that their order is not their creation order.
    fn run(i: u32) -> (SagaRecord, RecordedEvent) {
        let id = SagaId::new(format!("run-{}", i.wrapping_mul(7919) % RUNS)).unwrap();
        let definition = if i.is_multiple_of(2) { "build" } else { "deploy" };
        let mut record = SagaRecord::new(id, definition.into(), 1 + i % 3, Timestamp(u64::from(i)));
        if !i.is_multiple_of(7) {
            record.status = SagaStatus::Completed;
        }
        let first = RecordedEvent {
            seq: 0,
            at: Timestamp(u64::from(i)),
            event: Event::SagaStarted { definition: definition.into(), version: 1 + i % 3, input: vec![] },
        };
        (record, first)
    }

    #[tokio::test]
    async fn pages_cover_every_matching_run_once_in_id_order_at_100_000_runs() {
        let store = Arc::new(Counting::default());
        for i in 0..RUNS {
            let (record, first) = run(i);
            assert!(store.create(&record, &first).unwrap().is_none());
        }
        // No definitions: the runs still in flight wait for their version, untouched.
        let engine = Engine::builder().store(store.clone()).start().await.unwrap();
        let everything = engine.list(&SagaFilter::default()).unwrap();
        assert_eq!(everything.len(), RUNS as usize);
        let reads_before = store.full_reads.load(Ordering::SeqCst);

        let filters = [
            SagaFilter::default(),
            SagaFilter::default().definition("deploy").version(2),
            SagaFilter::default().status(&SagaStatus::Running).created_after(Timestamp(10_000)),
            SagaFilter::default().created_after(Timestamp(500)).created_before(Timestamp(2_500)),
            SagaFilter::default().definition("nothing"),
        ];
        for filter in &filters {
            let expected: Vec<SagaId> = engine.list(filter).unwrap().into_iter().map(|r| r.id).collect();
            let reads = store.full_reads.load(Ordering::SeqCst);
            let mut paged = Vec::new();
            let mut after: Option<SagaId> = None;
            loop {
                let page = engine.list_page(filter, after.as_ref(), 997).unwrap();
                assert!(page.records.len() <= 997);
                paged.extend(page.records.iter().map(|r| r.id.clone()));
                match page.next {
                    Some(next) => {
                        assert_eq!(
                            Some(&next),
                            page.records.last().map(|r| &r.id),
                            "the cursor is the last id"
                        );
                        after = Some(next);
                    }
                    None => break,
                }
            }
            assert_eq!(paged, expected, "{filter:?}");
            assert_eq!(store.full_reads.load(Ordering::SeqCst), reads, "a page read every record");
        }
        assert!(reads_before > 0);

        // A full last page says so: no empty page after it.
        let two = SagaFilter::default().created_before(Timestamp(2));
        let page = engine.list_page(&two, None, 2).unwrap();
        assert_eq!((page.records.len(), page.next), (2, None));
        // A limit of 0 asks for one.
        assert_eq!(engine.list_page(&two, None, 0).unwrap().records.len(), 1);
        engine.shutdown(std::time::Duration::from_secs(5)).await.unwrap();
    }
}
