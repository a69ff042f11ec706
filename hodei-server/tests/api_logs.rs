//! Following a job's log through the operator API while it is written, with the connection
//! dropped again and again: every byte arrives once, in order, with no gap.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use hodei_core::{Engine, MemoryStore};
use hodei_server::api::ApiServer;
use hodei_server::logstore::{LogStore, LogStream};
use reqwest::StatusCode;
use serde_json::Value;
use support::within;

const JOB: &str = "build-7/2#1";
const LINES: usize = 100_000;
const LINES_PER_BATCH: usize = 997;
/// The client hangs up after this many events, then reconnects with `Last-Event-ID`.
const EVENTS_PER_CONNECTION: usize = 7;

fn line(n: usize) -> String {
    format!("line {n:06} of the build log ✓\n")
}

/// One server-sent event.
#[derive(Debug, Default)]
struct Sse {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Reads whole events off the stream until `limit` of them came (then drops the connection), or
/// the server's `end` event.
async fn read_events(response: reqwest::Response, limit: usize) -> Vec<Sse> {
    let mut body = response.bytes_stream();
    let (mut buffer, mut events, mut current) = (String::new(), Vec::new(), Sse::default());
    while let Some(chunk) = body.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(at) = buffer.find('\n') {
            let line: String = buffer.drain(..=at).collect();
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                let event = std::mem::take(&mut current);
                let end = event.event.as_deref() == Some("end");
                if event.id.is_some() || end {
                    events.push(event);
                }
                if end || events.len() == limit {
                    return events;
                }
            } else if let Some(id) = line.strip_prefix("id: ") {
                current.id = Some(id.to_owned());
            } else if let Some(name) = line.strip_prefix("event: ") {
                current.event = Some(name.to_owned());
            } else if let Some(data) = line.strip_prefix("data: ") {
                current.data.push_str(data);
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_reconnects_gets_every_byte_once_over_100k_lines() {
    let dir = tempfile::tempdir().unwrap();
    let logs = Arc::new(LogStore::open(dir.path()).await.unwrap());
    logs.begin(JOB).await.unwrap();
    let engine = Engine::builder().store(MemoryStore::new()).start().await.unwrap();
    let server = ApiServer::builder(engine, dir.path())
        .logs(logs.clone())
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .serve()
        .await
        .unwrap();
    let token = std::fs::read_to_string(dir.path().join("api/admin-token")).unwrap().trim().to_owned();
    let url = format!("http://{}/api/v1/jobs/{}/logs/stdout?follow=true", server.local_addr(), "build-7%2F2%231");

    // The job writes while the client follows.
    let writer = tokio::spawn({
        let logs = logs.clone();
        async move {
            let mut offset = 0u64;
            for first in (0..LINES).step_by(LINES_PER_BATCH) {
                let batch: String = (first..(first + LINES_PER_BATCH).min(LINES)).map(line).collect();
                logs.append(JOB, LogStream::Stdout, offset, batch.as_bytes()).await.unwrap();
                offset += batch.len() as u64;
            }
            logs.close(JOB).await.unwrap();
        }
    });

    let client = reqwest::Client::new();
    let (mut text, mut last_id, mut connections) = (String::new(), None::<String>, 0);
    loop {
        let mut request = client.get(&url).bearer_auth(&token);
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let response = within(request.send()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        connections += 1;
        let events = within(read_events(response, EVENTS_PER_CONNECTION)).await;
        let mut ended = false;
        for event in events {
            if event.event.as_deref() == Some("end") {
                ended = true;
                break;
            }
            let chunk: Value = serde_json::from_str(&event.data).unwrap();
            // Each event continues exactly where the last one ended.
            let expected_offset = last_id.as_deref().map_or(0, |id| id.parse::<u64>().unwrap());
            assert_eq!(chunk["offset"].as_u64(), Some(expected_offset), "event {event:?}");
            text.push_str(chunk["text"].as_str().unwrap());
            last_id = event.id;
        }
        if ended {
            break;
        }
    }
    within(writer).await.unwrap();
    // Every line once, in order: checked by sequence number, then as a whole.
    let mut count = 0;
    for (n, got) in text.lines().enumerate() {
        assert_eq!(format!("{got}\n"), line(n), "line {n}");
        count += 1;
    }
    assert_eq!(count, LINES);
    assert_eq!(text.len(), (0..LINES).map(|n| line(n).len()).sum::<usize>());
    assert!(connections > 10, "the follow should have been cut and resumed many times, not {connections}");

    // A plain read from an offset. 64 bytes end inside line 2's `✓` (3 bytes): the two of it
    // that came are left for the next read, which starts where this one says.
    let start = line(0).len();
    let read = format!("http://{}/api/v1/jobs/build-7%2F2%231/logs/stdout?offset={start}&limit=64", server.local_addr());
    let chunk: Value = client.get(&read).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(chunk["text"].as_str().unwrap(), format!("{}line 000002 of the build log ", line(1)));
    assert_eq!(chunk["next_offset"].as_u64(), Some((start + 62) as u64));
    assert_eq!(chunk["closed"], false);
    let last = format!("http://{}/api/v1/jobs/build-7%2F2%231/logs/stdout?offset={}", server.local_addr(), text.len() - line(0).len());
    let chunk: Value = client.get(&last).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(chunk["text"].as_str().unwrap(), line(LINES - 1));
    assert_eq!(chunk["closed"], true);
    let missing = client
        .get(format!("http://{}/api/v1/jobs/none%231/logs/stdout", server.local_addr()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}
