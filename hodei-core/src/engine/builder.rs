use std::fmt;
#[cfg(feature = "sled")]
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast, watch};

use super::config::EngineConfig;
use super::registry::Registry;
use super::state::{Engine, Inner};
use crate::clock::Clock;
use crate::error::Result;
use crate::observe::Observer;
use crate::resources::Resources;
use crate::saga::SagaDefinition;
use crate::store::EventStore;
use crate::timers::Timers;

/// Configures and starts an [`Engine`].
pub struct EngineBuilder {
    store: StoreChoice,
    definitions: Vec<SagaDefinition>,
    config: EngineConfig,
    /// The first refused registration stays here until `start` reports it.
    resources: Result<Resources>,
    /// The wall clock, but for a time-skipping test's engine.
    clock: Clock,
}

enum StoreChoice {
    Given(Arc<dyn EventStore>),
    #[cfg(feature = "sled")]
    DataDir(PathBuf),
}

impl fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("definitions", &self.definitions)
            .field("config", &self.config)
            .field("resources", &self.resources)
            .finish()
    }
}

impl EngineBuilder {
    /// Keeps journals in this store.
    pub fn store(mut self, store: impl EventStore) -> Self {
        self.store = StoreChoice::Given(Arc::new(store));
        self
    }

    /// Keeps journals in a sled store in this directory (the default is `./hodei-data`).
    #[cfg(feature = "sled")]
    pub fn data_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = StoreChoice::DataDir(path.into());
        self
    }

    /// Registers a definition. Several versions of one name may be registered.
    pub fn register(mut self, definition: SagaDefinition) -> Self {
        self.definitions.push(definition);
        self
    }

    /// Registers a resource that every saga of this engine reaches by its type: a client, a
    /// connection pool, a job dispatcher. A saga body gets it with [`SagaContext::resource`],
    /// a step with [`StepContext::resource`], a compensation with
    /// [`CompensationContext::resource`]; branches and child sagas see the same resources.
    ///
    /// An engine holds one resource per type: registering a second value of one type makes
    /// [`start`](Self::start) fail with [`Error::DuplicateResource`] rather than silently
    /// keep one of them. To register two values of one type, wrap each in a type of its own.
    ///
    /// [`SagaContext::resource`]: crate::SagaContext::resource
    /// [`StepContext::resource`]: crate::StepContext::resource
    /// [`CompensationContext::resource`]: crate::CompensationContext::resource
    /// [`Error::DuplicateResource`]: crate::Error::DuplicateResource
    pub fn resource<T: Send + Sync + 'static>(self, value: T) -> Self {
        self.resource_arc(Arc::new(value))
    }

    /// Like [`resource`](Self::resource), for a value that is shared already: sagas get this
    /// very `Arc`.
    pub fn resource_arc<T: Send + Sync + 'static>(mut self, value: Arc<T>) -> Self {
        if let Ok(resources) = &mut self.resources
            && let Err(e) = resources.insert(value)
        {
            self.resources = Err(e);
        }
        self
    }

    /// Replaces the configuration (an [`observer`](Self::observer) set before stays).
    pub fn config(mut self, config: EngineConfig) -> Self {
        let observer = self.config.observer.take();
        self.config = config;
        self.config.observer = observer.or(self.config.observer.take());
        self
    }

    /// Tells `observer` what the engine journals and what its store's group commits take: see
    /// [`Observer`]. None by default, and then none of it is computed.
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.config.observer = Some(observer);
        self
    }

    /// The largest encoded payload accepted, in bytes.
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.config.max_payload_bytes = limit;
        self
    }

    /// Reads the time from `clock` instead of the wall clock: what a time-skipping test does.
    #[cfg_attr(not(any(feature = "testing", test)), allow(dead_code))]
    pub(crate) fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Opens the store and resumes every saga in flight. Must be called inside a Tokio
    /// runtime.
    // Without the sled feature the store has one source, so the match is infallible there.
    #[cfg_attr(not(feature = "sled"), allow(clippy::infallible_destructuring_match))]
    pub async fn start(self) -> Result<Engine> {
        let resources = Arc::new(self.resources?);
        let store: Arc<dyn EventStore> = match self.store {
            StoreChoice::Given(store) => store,
            #[cfg(feature = "sled")]
            StoreChoice::DataDir(path) => Arc::new(crate::store::SledStore::open(path)?),
        };
        if let Some(observer) = &self.config.observer {
            store.observe(observer.clone());
        }
        let shutdown = watch::Sender::new(false);
        let inner = Arc::new(Inner {
            store,
            registry: Registry::default(),
            live: Mutex::default(),
            bus: broadcast::Sender::new(self.config.event_buffer.max(1)),
            timers: Timers::start(shutdown.subscribe(), self.clock),
            shutdown,
            accepting: AtomicBool::new(true),
            drivers: Arc::new(watch::Sender::new(0)),
            recovered: watch::Sender::new(false),
            beats: watch::Sender::new(0),
            unwritten: Mutex::default(),
            halted: Arc::new(Notify::new()),
            resuming: Mutex::default(),
            config: self.config,
            resources,
        });
        for definition in self.definitions {
            inner.registry.add(definition)?;
        }
        let engine = Engine { inner };
        let recovered = engine.recover();
        // Also on failure: the drivers already spawned must not wait forever.
        engine.inner.recovered.send_replace(true);
        recovered?;
        Ok(engine)
    }
}

impl Engine {
    /// Starts configuring an engine. The default store is sled in `./hodei-data`.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            #[cfg(feature = "sled")]
            store: StoreChoice::DataDir(PathBuf::from("hodei-data")),
            #[cfg(not(feature = "sled"))]
            store: StoreChoice::Given(Arc::new(crate::store::MemoryStore::new())),
            definitions: Vec::new(),
            config: EngineConfig::default(),
            resources: Ok(Resources::default()),
            clock: Clock::System,
        }
    }
}
