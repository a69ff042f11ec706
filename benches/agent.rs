//! The agent and hub (issue 4) on the real path: a hub with its PKI, listeners and on-disk log
//! store, agents registered with one-time tokens and connected over mutual TLS on loopback, real
//! child processes as jobs. Each figure has its baseline measured in the same run:
//!
//! - `throughput`: a job's stdout through runner, agent, gRPC session, hub and log store, in
//!   MB/s (10^6 bytes), against a raw rustls stream with the same TLS configurations; and the
//!   log store alone against a synced sequential write of the same sizes in the same directory;
//! - `messages`: the log batches the runner sends for 100k lines, against one message a line;
//! - `memory`: peak RSS of an agent process streaming 1 GiB of logs, and at 1/8 of that volume;
//! - `latency`: dispatch and registration, median and p99, against spawning the job directly and
//!   against bare TLS handshakes with the same listeners.
//!
//! Run: `cargo bench --bench agent`. Knobs: `HODEI_BENCH_SCALE` multiplies the default volumes
//! and repetitions (a fraction shrinks them, to at least 1 MiB, line or repetition each); `HODEI_BENCH_THROUGHPUT_MIB` (default 256), `HODEI_BENCH_MEMORY_MIB`
//! (default 1024), `HODEI_BENCH_LINES` (default 100,000) and `HODEI_BENCH_LATENCY_REPS`
//! (default 50) set them outright; `HODEI_BENCH_ROUNDS` (default 3) sets the throughput rounds;
//! `HODEI_BENCH_ONLY=throughput,messages,memory,latency` runs only the named parts;
//! `HODEI_BENCH_VERBOSE=1` shows the agent process's output; `HODEI_BENCH_PROFILE=hodei`
//! (or `capped`, `store`, `disk`) runs one throughput path once and nothing else, for a
//! profiler. The hub writes every log byte to a temporary directory (the memory part up to its
//! largest volume at once), deleted afterwards.

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

#[path = "agent/harness.rs"]
mod harness;
#[path = "agent/raw.rs"]
mod raw;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Table, knob, median, scaled, thousands};
use harness::{HubSetup, job, proc_status_kib, run_checked_job, within};
use hodei::agent::pki::agent_client_config;
use hodei::agent::runner::{BatchLimits, BufferStats, JobRunner, JobSpec, RunnerConfig, Secrets};
use hodei::server::hub::HubConfig;
use hodei::server::logstore::{Bytes, LogStatus, LogStore, LogStoreConfig, LogStoreError, LogStream};
use tokio::sync::{mpsc, watch};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some(harness::CHILD_FLAG) {
        return harness::child_main(args.collect());
    }
    common::runtime().block_on(async {
        if let Ok(path) = std::env::var("HODEI_BENCH_PROFILE") {
            return profile(&path).await;
        }
        println!("## hodei agent benchmarks (hub and agent over mTLS on loopback)");
        if common::selected("throughput") {
            throughput().await;
        }
        if common::selected("messages") {
            messages().await;
        }
        if common::selected("memory") {
            memory().await;
        }
        if common::selected("latency") {
            latency().await;
        }
    });
    ExitCode::SUCCESS
}

const MIB: usize = 1 << 20;

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

/// The command every log-volume figure runs: its own cost is a read of `/dev/zero` and a write
/// to the pipe per block, which the `pipe` row measures.
fn zeros(bytes: usize) -> Vec<String> {
    ["/usr/bin/head", "-c", &bytes.to_string(), "/dev/zero"].map(str::to_owned).to_vec()
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The batch limits a hub announces by default, which its agents then batch by.
fn hub_batch_limits() -> BatchLimits {
    let hub = HubConfig::default();
    BatchLimits {
        max_bytes: usize::try_from(hub.log_batch_max_bytes).expect("a batch size that fits in memory"),
        max_delay: hub.log_batch_max_delay,
    }
}

/// Writes `bytes` to a fresh log store in batches of the hub's default batch size, synced as a
/// hub session syncs them (group commit): one sync in flight while writes go on, the next one
/// started when it returns and covering every batch written meanwhile, and the log closed
/// (everything synced) at the end. The store's share of the hodei path.
async fn store_alone(dir: &Path, bytes: usize) -> Duration {
    let config = LogStoreConfig::default().with_max_stream_bytes(bytes as u64);
    let store = Arc::new(LogStore::open_with_config(dir, config).await.expect("opening a log store"));
    let batch = Bytes::from(vec![0u8; hub_batch_limits().max_bytes]);
    let started = Instant::now();
    let mut offset = 0;
    let mut syncing: Option<tokio::task::JoinHandle<Result<LogStatus, LogStoreError>>> = None;
    while offset < bytes {
        let n = batch.len().min(bytes - offset);
        store
            .write("store-alone", LogStream::Stdout, offset as u64, batch.slice(..n))
            .await
            .expect("writing");
        offset += n;
        if syncing.as_ref().is_some_and(|sync| sync.is_finished()) {
            syncing.take().expect("a sync").await.expect("the sync task").expect("syncing");
        }
        if syncing.is_none() {
            let store = Arc::clone(&store);
            syncing = Some(tokio::spawn(async move { store.sync("store-alone").await }));
        }
    }
    if let Some(sync) = syncing {
        sync.await.expect("the sync task").expect("syncing");
    }
    store.close("store-alone").await.expect("closing the log");
    let status = store.status("store-alone").await.expect("the log's status");
    assert_eq!(status.stream(LogStream::Stdout).end, bytes as u64, "every byte durable");
    started.elapsed()
}

/// The log store alone and its disk baseline, in one temporary directory, in an order that
/// alternates by round so that neither always meets a page cache the other filled. Returns
/// the store's time and the baseline's.
async fn store_and_disk(bytes: usize, round: usize) -> (Duration, Duration) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let chunk = hub_batch_limits().max_bytes;
    if round.is_multiple_of(2) {
        let store = store_alone(dir.path(), bytes).await;
        (store, raw::synced_writes(dir.path(), bytes, chunk).await)
    } else {
        let disk = raw::synced_writes(dir.path(), bytes, chunk).await;
        (store_alone(dir.path(), bytes).await, disk)
    }
}

/// One path of the throughput figure alone, once, for a profiler (`valgrind --tool=callgrind`)
/// to see nothing else: `hodei` (job to log store), `capped` (the same, the store past its cap),
/// `store` (the log store alone) or `disk` (its synced-write baseline).
async fn profile(path: &str) {
    let bytes = knob("HODEI_BENCH_THROUGHPUT_MIB", scaled(256)) * MIB;
    let took = match path {
        "hodei" | "capped" => {
            let setup = HubSetup::start(if path == "hodei" { bytes as u64 } else { 64 * 1024 }).await;
            let (agent, _) = setup.start_in_process("w-profile").await;
            let took =
                run_checked_job(&setup, "w-profile", job("profile", &as_strs(&zeros(bytes))), bytes as u64)
                    .await;
            agent.stop().await;
            took
        }
        "store" => store_alone(tempfile::tempdir().expect("a temporary directory").path(), bytes).await,
        "disk" => {
            let dir = tempfile::tempdir().expect("a temporary directory");
            raw::synced_writes(dir.path(), bytes, hub_batch_limits().max_bytes).await
        }
        other => panic!("HODEI_BENCH_PROFILE={other}: expected hodei, capped, store or disk"),
    };
    println!("{path}: {} MiB in {took:?}, {:.0} MB/s", bytes / MIB, mb_per_s(bytes, took));
}

async fn throughput() {
    let mib = knob("HODEI_BENCH_THROUGHPUT_MIB", scaled(256));
    let rounds = knob("HODEI_BENCH_ROUNDS", 3).max(1);
    let bytes = mib * MIB;
    let command = zeros(bytes);
    let (mut ours, mut tls, mut pipe, mut store, mut ratios) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut uncapped, mut job_tls, mut disk) = (vec![], vec![], vec![]);
    // Rounds alternate the paths and each ratio is taken within its round, so that load from
    // other tenants of the machine shifts both sides alike. Each round has a hub of its own,
    // whose directory, with the round's log, is deleted at its end.
    for round in 0..rounds {
        let setup = HubSetup::start(bytes as u64).await;
        let (agent, _) = setup.start_in_process("w-throughput").await;
        let spec = job(&format!("throughput-{round}"), &as_strs(&command));
        let hodei = mb_per_s(bytes, run_checked_job(&setup, "w-throughput", spec, bytes as u64).await);
        agent.stop().await;
        // The same path with a hub whose store is past its cap after the first 64 KiB: it counts
        // and acknowledges the rest without writing or syncing, so the store's share shows.
        let counting = HubSetup::start(64 * 1024).await;
        let (agent, _) = counting.start_in_process("w-throughput").await;
        let spec = job(&format!("counted-{round}"), &as_strs(&command));
        let took = run_checked_job(&counting, "w-throughput", spec, bytes as u64).await;
        uncapped.push(mb_per_s(bytes, took));
        agent.stop().await;

        let server = setup.pki.mtls_server_config(&setup.identity).expect("the hub's mTLS server config");
        let identity = setup.worker_identity("w-raw");
        let client =
            agent_client_config(setup.pki.ca_bundle_pem(), Some(&identity)).expect("a client config");
        let raw = mb_per_s(bytes, raw::tls_stream(Arc::clone(&server), Arc::clone(&client), bytes).await);
        let (took, moved) = raw::job_over_tls(server, client, &as_strs(&command)).await;
        assert_eq!(moved, bytes, "the command's output");
        job_tls.push(mb_per_s(bytes, took));

        let (took, read) = raw::pipe_read(&as_strs(&command)).await;
        assert_eq!(read, bytes, "the command's output");
        pipe.push(mb_per_s(bytes, took));
        let (store_took, disk_took) = store_and_disk(bytes, round).await;
        store.push(mb_per_s(bytes, store_took));
        disk.push(mb_per_s(bytes, disk_took));
        ours.push(hodei);
        tls.push(raw);
        ratios.push(hodei / raw);
    }
    let limits = hub_batch_limits();
    let table = Table::new(
        &format!(
            "Log throughput: {mib} MiB of stdout (`head -c`), batches of up to {} KiB, median of {rounds} rounds",
            limits.max_bytes / 1024
        ),
        &["path", "MB/s", "vs raw rustls", "target"],
    );
    let mbs = |v: Vec<f64>| format!("{:.0}", median(v));
    let of_raw = |v: &[f64]| {
        let per_round: Vec<f64> = v.iter().zip(&tls).map(|(x, raw)| x / raw).collect();
        format!("{:.0} %", 100.0 * median(per_round))
    };
    let (pipe_ratio, store_ratio, uncapped_ratio) = (of_raw(&pipe), of_raw(&store), of_raw(&uncapped));
    let (job_tls_ratio, disk_ratio) = (of_raw(&job_tls), of_raw(&disk));
    // The store against the disk, per round, as ours against the raw stream.
    let of_disk: Vec<f64> = store.iter().zip(&disk).map(|(x, limit)| x / limit).collect();
    // Ours against the same job's stdout through a bare TLS stream, per round: what the
    // pipeline costs beyond moving the job's bytes at all.
    let of_job_tls: Vec<f64> = ours.iter().zip(&job_tls).map(|(x, limit)| x / limit).collect();
    table.row(&[
        "hodei: job -> runner -> agent -> gRPC over mTLS -> hub -> log store (group commit)".into(),
        mbs(ours),
        format!("{:.0} %", 100.0 * median(ratios)),
        ">= 50 %".into(),
    ]);
    table.row(&[
        "hodei, the store past its cap: bytes counted and acknowledged, not written".into(),
        mbs(uncapped),
        uncapped_ratio,
        String::new(),
    ]);
    table.row(&[
        "raw rustls stream, same TLS 1.3 configs (ring), 64 KiB writes".into(),
        mbs(tls),
        "100 %".into(),
        String::new(),
    ]);
    table.row(&[
        "the same job's stdout copied straight into a raw rustls stream (no runner, gRPC, store)".into(),
        mbs(job_tls),
        job_tls_ratio,
        String::new(),
    ]);
    table.row(&[
        "the job alone: its pipe read straight by tokio (no TLS, no store)".into(),
        mbs(pipe),
        pipe_ratio,
        String::new(),
    ]);
    table.row(&[
        format!("the log store alone: {} KiB writes, group commit as the hub's", limits.max_bytes / 1024),
        mbs(store),
        store_ratio,
        String::new(),
    ]);
    table.row(&[
        format!(
            "a synced sequential write of the same sizes: {} KiB writes, `sync_data` after each, same directory",
            limits.max_bytes / 1024
        ),
        mbs(disk),
        disk_ratio,
        String::new(),
    ]);
    println!(
        "hodei against the same job's stdout through a raw rustls stream: {:.0} % (median of the rounds' ratios)",
        100.0 * median(of_job_tls)
    );
    println!(
        "the log store alone against a synced sequential write of the same sizes: {:.0} % (median of the rounds' ratios; target >= 70 %)",
        100.0 * median(of_disk)
    );
}

/// What the runner did with one job's stdout.
struct Batched {
    batches: usize,
    bytes: u64,
    newlines: usize,
    /// Output bytes the runner held at most, and the most it can ever hold.
    buffer: BufferStats,
}

/// Runs `command` through the runner alone with `limits`, counting its batches as they reach
/// the sink, where the agent turns each into one `LogBatch` message.
async fn run_batched(command: &[String], limits: BatchLimits) -> Batched {
    let runner = JobRunner::new(RunnerConfig::default().batch(limits));
    let (sink, mut received) = mpsc::channel(16);
    let spec = JobSpec::command(&command[0], &command[1..]).env("PATH", "/usr/bin:/bin");
    let running = runner.start(spec, Secrets::new(), sink, None).expect("starting the job");
    let monitor = running.buffer_monitor();
    let counter = tokio::spawn(async move {
        let (mut batches, mut bytes, mut newlines) = (0, 0, 0);
        while let Some(batch) = received.recv().await {
            assert_eq!(batch.offset, bytes, "batches tile the stream");
            batches += 1;
            bytes += batch.data.len() as u64;
            newlines += batch.data.iter().filter(|&&b| b == b'\n').count();
        }
        (batches, bytes, newlines)
    });
    let result = within("a job", running.wait()).await.expect("the job's result");
    let (batches, bytes, newlines) = counter.await.expect("the counting task");
    assert_eq!(bytes, result.stdout_bytes, "every byte went through the sink");
    Batched { batches, bytes, newlines, buffer: monitor.stats() }
}

async fn messages() {
    let lines = knob("HODEI_BENCH_LINES", scaled(100_000));
    let table = Table::new(
        &format!("Messages for {} lines: log batches against one message a line", thousands(lines as f64)),
        &["job", "batch limits", "bytes", "messages", "one a line", "fewer messages", "claim"],
    );
    // Short lines, and lines as long as a compiler's, since a batch is bounded by bytes.
    let workloads = [
        (format!("`seq {lines}`"), vec!["/usr/bin/seq".to_owned(), lines.to_string()]),
        (
            format!("{} 80-byte lines", thousands(lines as f64)),
            vec![
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                format!("yes '{}' | head -n {lines}", "x".repeat(79)),
            ],
        ),
    ];
    let limits = [("hub default", hub_batch_limits()), ("runner default", BatchLimits::default())];
    for (name, command) in &workloads {
        for (which, limits) in limits {
            let Batched { batches, bytes, newlines, .. } = run_batched(command, limits).await;
            assert_eq!(newlines, lines, "the job printed every line");
            table.row(&[
                name.clone(),
                format!("{which}: {} KiB / {} ms", limits.max_bytes / 1024, limits.max_delay.as_millis()),
                thousands(bytes as f64),
                thousands(batches as f64),
                thousands(lines as f64),
                format!("{:.3} %", 100.0 * (1.0 - batches as f64 / lines as f64)),
                "90-99 %".into(),
            ]);
        }
    }
}

/// What one agent process used while it streamed `bytes` of stdout.
struct Footprint {
    idle_kib: u64,
    sampled_peak_kib: u64,
    hwm_kib: u64,
    elapsed: Duration,
}

/// Runs `head -c bytes` on a fresh agent process, sampling its `VmRSS` every 10 ms meanwhile,
/// and reads its `VmHWM` (the kernel's own peak) before it stops.
async fn stream_in_child(bytes: usize) -> Footprint {
    let setup = HubSetup::start(bytes as u64).await;
    let (agent, _) = setup.start_child("w-memory").await;
    let pid = agent.pid;
    let idle_kib = proc_status_kib(pid, "VmRSS").expect("the agent's VmRSS");
    let (done, mut finished) = watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        let mut every = tokio::time::interval(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = every.tick() => peak = peak.max(proc_status_kib(pid, "VmRSS").unwrap_or(0)),
                _ = finished.wait_for(|done| *done) => return peak,
            }
        }
    });
    let spec = job("memory", &as_strs(&zeros(bytes)));
    let elapsed = run_checked_job(&setup, "w-memory", spec, bytes as u64).await;
    done.send_replace(true);
    let sampled_peak_kib = sampler.await.expect("the sampler");
    let hwm_kib = proc_status_kib(pid, "VmHWM").expect("the agent's VmHWM");
    agent.stop().await;
    Footprint { idle_kib, sampled_peak_kib, hwm_kib, elapsed }
}

async fn memory() {
    let big = knob("HODEI_BENCH_MEMORY_MIB", scaled(1024)).max(1);
    let small = (big / 8).max(1);
    let table = Table::new(
        "Memory: peak RSS of an agent process streaming a job's stdout (`head -c`) to the hub",
        &["volume", "RSS connected, idle", "peak VmRSS sampled (10 ms)", "VmHWM", "MB/s"],
    );
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let mut peaks = Vec::new();
    for volume in [small, big] {
        let footprint = stream_in_child(volume * MIB).await;
        table.row(&[
            format!("{volume} MiB"),
            mib(footprint.idle_kib),
            mib(footprint.sampled_peak_kib),
            mib(footprint.hwm_kib),
            format!("{:.0}", mb_per_s(volume * MIB, footprint.elapsed)),
        ]);
        peaks.push(footprint.hwm_kib);
    }
    println!(
        "\nVmHWM at {big} MiB / at {small} MiB: {:.2}x (flat is 1.00x; the target is a bound whatever the volume)",
        peaks[1] as f64 / peaks[0] as f64
    );
    // The part of that bound the runner owns, read from its own gauge in this process.
    let buffer = run_batched(&zeros(small * MIB), hub_batch_limits()).await.buffer;
    println!(
        "Output held by the runner for one job ({small} MiB, hub batch limits): peak {} KiB, bound {} KiB",
        buffer.peak / 1024,
        buffer.bound / 1024
    );
    assert!(buffer.peak <= buffer.bound, "the runner held more output than its bound");
}

/// The value below which `q` of the values lie (nearest rank).
fn percentile(values: &[Duration], q: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

async fn latency() {
    let reps = knob("HODEI_BENCH_LATENCY_REPS", scaled(50)).max(1);
    let setup = HubSetup::start(LogStoreConfig::default().max_stream_bytes).await;

    let (mut in_process, mut child, mut handshakes) = (vec![], vec![], vec![]);
    let anonymous = agent_client_config(setup.pki.ca_bundle_pem(), None).expect("a client config");
    let identity = setup.worker_identity("w-handshake");
    let mutual = agent_client_config(setup.pki.ca_bundle_pem(), Some(&identity)).expect("a client config");
    for i in 0..reps {
        let (agent, took) = setup.start_in_process(&format!("reg-in-{i}")).await;
        in_process.push(took);
        agent.stop().await;
        let (agent, took) = setup.start_child(&format!("reg-child-{i}")).await;
        child.push(took);
        agent.stop().await;
        let registration = raw::handshake(setup.registration.local_addr(), Arc::clone(&anonymous)).await;
        let session = raw::handshake(setup.sessions.local_addr(), Arc::clone(&mutual)).await;
        handshakes.push(registration + session);
    }

    let (agent, _) = setup.start_in_process("w-dispatch").await;
    let (mut dispatch, mut round_trip, mut spawn_running, mut spawn_done) = (vec![], vec![], vec![], vec![]);
    // A few jobs first, so that the first figures do not include warming caches.
    for i in 0..reps.min(5) {
        run_checked_job(&setup, "w-dispatch", job(&format!("warm-{i}"), &raw::DATE), 20).await;
        raw::spawn_date().await;
    }
    for i in 0..reps {
        let job_id = format!("dispatch-{i}");
        let called_ns = raw::now_unix_ns();
        round_trip.push(run_checked_job(&setup, "w-dispatch", job(&job_id, &raw::DATE), 20).await);
        let stamp = setup.logs.read(&job_id, LogStream::Stdout, 0, 64).await.expect("the job's log");
        dispatch.push(raw::since(called_ns, raw::printed_unix_ns(&stamp.bytes)));
        let (running, done) = raw::spawn_date().await;
        spawn_running.push(running);
        spawn_done.push(done);
    }
    agent.stop().await;

    let table = Table::new(
        &format!("Latency: {reps} repetitions each, agent and hub on this machine"),
        &["figure", "hodei p50", "hodei p99", "floor", "floor p50", "floor p99", "p50 / floor p50"],
    );
    let figures = [
        (
            "dispatch: `run_job` called -> the job's process running (its own clock reading)",
            dispatch,
            "tokio `Command::spawn` -> the process running",
            spawn_running,
        ),
        (
            "job round trip: `run_job` called -> result back, log closed",
            round_trip,
            "tokio spawn -> output read, exit reaped",
            spawn_done,
        ),
        (
            "registration, agent in-process: `agent::run` called -> session in the hub's registry",
            in_process,
            "TCP + TLS handshake with the registration listener, then TCP + mTLS with the session one",
            handshakes.clone(),
        ),
        (
            "registration, agent process: spawn -> session in the hub's registry",
            child,
            "the same two handshakes",
            handshakes,
        ),
    ];
    for (figure, ours, floor_name, floor) in figures {
        let (p50, floor_p50) = (percentile(&ours, 0.5), percentile(&floor, 0.5));
        table.row(&[
            figure.into(),
            millis(p50),
            millis(percentile(&ours, 0.99)),
            floor_name.into(),
            millis(floor_p50),
            millis(percentile(&floor, 0.99)),
            format!("{:.1}x", p50.as_secs_f64() / floor_p50.as_secs_f64()),
        ]);
    }
}
