//! The Kubernetes provider against a scripted fake API server (kube's `tower-test` mock): every
//! request is asserted (method, path, the query and body fields that matter) and answered with
//! JSON shaped like the real API server's. `real_cluster_end_to_end` runs against a real cluster
//! when asked for with `--ignored` (see its doc).

#![cfg(feature = "kubernetes")]

mod kubernetes_support;

use std::collections::BTreeMap;
use std::time::Duration;

use hodei_providers::kubernetes::k8s_openapi::api::core::v1::Toleration;
use hodei_providers::kubernetes::{KubernetesConfig, KubernetesProvider};
use hodei_providers::{
    Provider, ProviderError, SAGA_ID_LABEL, WORKER_ID_LABEL, WorkerInfo, WorkerSpec, WorkerState,
};
use hodei_server::jobs::Resources;
use http::Method;
use kubernetes_support::*;
use serde_json::{Value, json};

fn config() -> KubernetesConfig {
    KubernetesConfig::default()
        .namespace(NAMESPACE)
        .image(AGENT_IMAGE)
        .node_selector("kubernetes.io/os", "linux")
        .toleration(Toleration {
            key: Some("hodei.dev/workers".to_owned()),
            operator: Some("Exists".to_owned()),
            effect: Some("NoSchedule".to_owned()),
            ..Toleration::default()
        })
        .service_account("hodei-worker")
        .start_timeout(Duration::from_secs(30))
}

fn provider() -> (KubernetesProvider, FakeApiServer) {
    let (client, api) = fake_cluster();
    (KubernetesProvider::new(client, config()), api)
}

/// Runs the provider's call and the server's script together; the script's assertions fail
/// the test. Then checks that the provider sent nothing the script did not expect.
async fn scripted<T>(
    provider: KubernetesProvider,
    mut api: FakeApiServer,
    call: impl AsyncFnOnce(&KubernetesProvider) -> T,
    script: impl AsyncFnOnce(&mut FakeApiServer),
) -> T {
    let (result, ()) = tokio::time::timeout(LIMIT, async { tokio::join!(call(&provider), script(&mut api)) })
        .await
        .expect("the provider and the script finished");
    drop(provider);
    api.expect_no_more().await;
    result
}

/// [`scripted`] for a provision of `spec` with the test configuration.
async fn provision_scripted(
    spec: &WorkerSpec,
    script: impl AsyncFnOnce(&mut FakeApiServer),
) -> Result<WorkerInfo, ProviderError> {
    let (provider, api) = provider();
    scripted(provider, api, async |provider| provider.provision(spec).await, script).await
}

fn env_of(pod: &Value) -> BTreeMap<String, Value> {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .expect("the agent's container has an environment")
        .iter()
        .map(|var| (var["name"].as_str().unwrap().to_owned(), var.clone()))
        .collect()
}

#[tokio::test]
async fn provision_creates_the_config_map_and_pod_and_watches_until_running() {
    let agent = agent_env();
    let mut spec = WorkerSpec::new("w-1", agent.clone());
    spec.saga_id = Some("nightly/2026 release".to_owned());
    spec.labels.insert("team".to_owned(), "ci".to_owned());
    spec.resources = Resources::new(Some(500), Some(64 << 20));
    spec.provider_config.insert("service_account".to_owned(), "builder".to_owned());
    spec.provider_config.insert("node_selector".to_owned(), "disktype=ssd".to_owned());
    spec.provider_config.insert(
        "tolerations".to_owned(),
        r#"[{"key":"gpu","operator":"Equal","value":"true","effect":"NoExecute","tolerationSeconds":30}]"#
            .to_owned(),
    );
    spec.provider_config.insert("active_deadline_seconds".to_owned(), "3600".to_owned());
    spec.provider_config.insert("network_mode".to_owned(), "host".to_owned());
    let expected_labels = spec.all_labels();

    let info = provision_scripted(&spec, async |api| {
            let config_map = api.expect(Method::POST, &config_maps_path()).await;
            let body = config_map.body.clone();
            assert_eq!(body["kind"], "ConfigMap");
            assert_eq!(body["metadata"]["name"], "hodei-w-1-ca");
            assert_eq!(body["metadata"]["namespace"], NAMESPACE);
            assert_eq!(body["data"]["ca.pem"], agent.ca_bundle_pem.as_str());
            assert_eq!(body["immutable"], true);
            let labels = &body["metadata"]["labels"];
            assert_eq!(labels["hodei.dev/managed-by"], "hodei");
            assert_eq!(labels["hodei.dev/worker-id"], "w-1");
            config_map.reply(201, created(body, "100"));

            let pod_request = api.expect(Method::POST, &pods_path()).await;
            let body = pod_request.body.clone();
            assert_eq!(body["kind"], "Pod");
            assert_eq!(body["metadata"]["name"], "hodei-w-1");
            assert_eq!(body["metadata"]["namespace"], NAMESPACE);
            let labels = &body["metadata"]["labels"];
            assert_eq!(labels["hodei.dev/managed-by"], "hodei");
            assert_eq!(labels["hodei.dev/worker-id"], "w-1");
            assert_eq!(labels["team"], "ci");
            // A saga id with `/` and a space is no label value: sanitized, hashed, and kept
            // whole in the annotation of the same key.
            let saga_label = labels["hodei.dev/saga-id"].as_str().unwrap();
            assert!(saga_label.starts_with("nightly-2026-release-"), "{saga_label}");
            assert_eq!(body["metadata"]["annotations"]["hodei.dev/saga-id"], "nightly/2026 release");

            let spec_body = &body["spec"];
            assert_eq!(spec_body["restartPolicy"], "Never");
            assert_eq!(spec_body["activeDeadlineSeconds"], 3600);
            assert_eq!(spec_body["serviceAccountName"], "builder");
            assert_eq!(spec_body["automountServiceAccountToken"], false);
            assert_eq!(spec_body["nodeSelector"], json!({"kubernetes.io/os": "linux", "disktype": "ssd"}));
            assert_eq!(
                spec_body["tolerations"],
                json!([
                    {"key": "hodei.dev/workers", "operator": "Exists", "effect": "NoSchedule"},
                    {"key": "gpu", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 30},
                ])
            );
            let container = &spec_body["containers"][0];
            assert_eq!(container["name"], "agent");
            assert_eq!(container["image"], AGENT_IMAGE);
            let amounts = json!({"cpu": "500m", "memory": "67108864"});
            assert_eq!(container["resources"], json!({"requests": amounts, "limits": amounts}));
            assert_eq!(
                spec_body["volumes"],
                json!([
                    {"name": "ca", "configMap": {"name": "hodei-w-1-ca", "items": [{"key": "ca.pem", "path": "ca.pem", "mode": 0o444}]}},
                    {"name": "agent", "emptyDir": {}},
                ])
            );

            let env = env_of(&body);
            let names: Vec<&str> = env.keys().map(String::as_str).collect();
            assert_eq!(
                names,
                [
                    "HODEI_CA_BUNDLE",
                    "HODEI_REGISTRATION_ADDR",
                    "HODEI_SESSION_ADDR",
                    "HODEI_TOKEN",
                    "HODEI_WORKER_ID",
                    "HODEI_WORK_DIR"
                ]
            );
            assert_eq!(env["HODEI_TOKEN"]["value"], agent.token.as_str());
            assert_eq!(env["HODEI_CA_BUNDLE"]["value"], "/hodei/ca/ca.pem");
            assert!(env.values().all(|var| var.get("valueFrom").is_none()), "{env:?}");
            // The token is the only credential: it appears once, nothing refers to a Secret,
            // and no service account token is mounted.
            let whole = body.to_string();
            assert_eq!(whole.matches(agent.token.as_str()).count(), 1, "{whole}");
            for secretish in ["secretKeyRef", "secretRef", "\"secret\"", "imagePullSecrets", "projected"] {
                assert!(!whole.contains(secretish), "`{secretish}` in {whole}");
            }
            pod_request.reply(201, created(body, "101"));

            // The first watch ends (the API server's timeout) with the pod still creating its
            // container: the provider watches again from the last version it saw.
            let watch = api.expect(Method::GET, &pods_path()).await;
            assert_watch_of(&watch, "hodei-w-1", "101");
            watch.reply_events(&[("MODIFIED", pod("hodei-w-1", "102", waiting("ContainerCreating", "")))]);
            let watch = api.expect(Method::GET, &pods_path()).await;
            assert_watch_of(&watch, "hodei-w-1", "102");
            watch.reply_events(&[("MODIFIED", pod("hodei-w-1", "103", running()))]);
    })
    .await
    .expect("provisioned");
    assert_eq!(info.worker_id, "w-1");
    assert_eq!(info.handle, "hodei-w-1");
    assert_eq!(info.state, WorkerState::Running);
    assert_eq!(info.labels, expected_labels);
}

#[tokio::test]
async fn an_image_pull_failure_is_image_missing_with_the_kubelet_message_and_is_cleaned_up() {
    let spec = WorkerSpec::new("w-img", agent_env());
    let message = "rpc error: code = NotFound desc = failed to pull and unpack image \
                   \"docker.io/library/hodei-agent:test\": not found";
    let error = provision_scripted(&spec, async |api| {
        let pending = pod("hodei-w-img", "102", waiting("ContainerCreating", ""));
        let failed = pod("hodei-w-img", "103", waiting("ErrImagePull", message));
        api.answer_start("hodei-w-img", vec![("MODIFIED", pending), ("MODIFIED", failed)]).await;
        api.answer_destroy("hodei-w-img").await;
    })
    .await
    .expect_err("the image cannot be pulled");
    match &error {
        ProviderError::ImageMissing { image, hint, .. } => {
            assert_eq!(image, AGENT_IMAGE);
            assert!(hint.contains("ErrImagePull") && hint.contains(message), "{hint}");
        }
        other => panic!("expected ImageMissing, got {other:?}"),
    }
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn an_invalid_image_name_is_an_invalid_spec() {
    let mut spec = WorkerSpec::new("w-bad", agent_env());
    spec.image = Some("Registry/UPPER:case".to_owned());
    let message = "Failed to apply default image tag \"Registry/UPPER:case\": couldn't parse image name";
    let error = provision_scripted(&spec, async |api| {
        let (_, pod_body) = api
            .answer_start(
                "hodei-w-bad",
                vec![("MODIFIED", pod("hodei-w-bad", "102", waiting("InvalidImageName", message)))],
            )
            .await;
        assert_eq!(pod_body["spec"]["containers"][0]["image"], "Registry/UPPER:case");
        api.answer_destroy("hodei-w-bad").await;
    })
    .await
    .expect_err("the image name is invalid");
    match &error {
        ProviderError::InvalidSpec { reason, .. } => {
            assert!(reason.contains("InvalidImageName") && reason.contains(message), "{reason}")
        }
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unschedulable_pod_fails_with_the_scheduler_message() {
    let mut spec = WorkerSpec::new("w-big", agent_env());
    spec.resources = Resources::new(Some(64_000), None);
    let message = "0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are available: \
                   3 No preemption victims found for incoming pod.";
    let error = provision_scripted(&spec, async |api| {
        let unschedulable = json!({
            "phase": "Pending",
            "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": message, "lastTransitionTime": "2026-12-01T10:00:01Z",
            }],
            "qosClass": "Guaranteed",
        });
        let (_, pod_body) = api
            .answer_start("hodei-w-big", vec![("MODIFIED", pod("hodei-w-big", "102", unschedulable))])
            .await;
        assert_eq!(pod_body["spec"]["containers"][0]["resources"]["requests"]["cpu"], "64000m");
        api.answer_destroy("hodei-w-big").await;
    })
    .await
    .expect_err("no node fits");
    match &error {
        ProviderError::Infrastructure { reason, .. } => {
            assert!(reason.contains("Unschedulable") && reason.contains(message), "{reason}")
        }
        other => panic!("expected Infrastructure, got {other:?}"),
    }
    assert!(error.is_retryable(), "a cluster may grow");
}

#[tokio::test]
async fn with_an_autoscaler_an_unschedulable_pod_is_waited_on() {
    let (client, api) = fake_cluster();
    let provider = KubernetesProvider::new(client, config().wait_while_unschedulable(true));
    let spec = WorkerSpec::new("w-scale", agent_env());
    let info = scripted(
        provider,
        api,
        async |provider| provider.provision(&spec).await,
        async |api| {
            let unschedulable = json!({
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/1 nodes are available: 1 Insufficient memory."}],
            });
            let events = vec![
                ("MODIFIED", pod("hodei-w-scale", "102", unschedulable)),
                // The autoscaler's new node: scheduled there, and started.
                ("MODIFIED", pod("hodei-w-scale", "140", running())),
            ];
            api.answer_start("hodei-w-scale", events).await;
        },
    )
    .await
    .expect("started once a node was added");
    assert_eq!(info.state, WorkerState::Running);
}

#[tokio::test]
async fn a_crash_loop_is_exited_before_registering_with_its_output() {
    let spec = WorkerSpec::new("w-crash", agent_env());
    let error = provision_scripted(&spec, async |api| {
        let mut crashing = waiting(
            "CrashLoopBackOff",
            "back-off 10s restarting failed container=agent pod=hodei-w-crash_ci(uid-hodei-w-crash)",
        );
        crashing["containerStatuses"][0]["restartCount"] = json!(1);
        crashing["containerStatuses"][0]["lastState"] = json!({"terminated": {
            "exitCode": 1, "reason": "Error", "startedAt": "2026-12-01T10:00:03Z",
            "finishedAt": "2026-12-01T10:00:04Z",
        }});
        api.answer_start("hodei-w-crash", vec![("MODIFIED", pod("hodei-w-crash", "102", crashing))]).await;
        api.answer_logs("hodei-w-crash", "hodei-agent: cannot reach 10.0.0.1:7001\n").await;
        api.answer_destroy("hodei-w-crash").await;
    })
    .await
    .expect_err("the agent crashes");
    match &error {
        ProviderError::ExitedBeforeRegistering { worker_id, status, output, .. } => {
            assert_eq!(worker_id, "w-crash");
            assert!(status.starts_with("CrashLoopBackOff: back-off 10s"), "{status}");
            assert!(status.contains("exited with code 1 (Error)"), "{status}");
            assert_eq!(output, "hodei-agent: cannot reach 10.0.0.1:7001\n");
        }
        other => panic!("expected ExitedBeforeRegistering, got {other:?}"),
    }
}

#[tokio::test]
async fn a_container_that_ends_before_running_is_exited_before_registering() {
    let spec = WorkerSpec::new("w-exit", agent_env());
    let error = provision_scripted(&spec, async |api| {
        let ended = scheduled_with(
            "Failed",
            json!({"terminated": {"exitCode": 2, "reason": "Error", "message": "bad flag",
                    "startedAt": "2026-12-01T10:00:03Z", "finishedAt": "2026-12-01T10:00:03Z"}}),
        );
        api.answer_start("hodei-w-exit", vec![("MODIFIED", pod("hodei-w-exit", "102", ended))]).await;
        api.answer_logs("hodei-w-exit", "hodei-agent: --session-addr: required\n").await;
        api.answer_destroy("hodei-w-exit").await;
    })
    .await
    .expect_err("the agent exits");
    match &error {
        ProviderError::ExitedBeforeRegistering { status, output, .. } => {
            assert_eq!(status, "exited with code 2 (Error): bad flag");
            assert!(output.contains("--session-addr: required"), "{output}");
        }
        other => panic!("expected ExitedBeforeRegistering, got {other:?}"),
    }
}

#[tokio::test]
async fn destroy_deletes_the_pod_waits_until_it_is_gone_then_deletes_the_config_map() {
    let (provider, api) = provider();
    let mut delete_body = Value::Null;
    scripted(
        provider,
        api,
        async |provider| provider.destroy("w-1").await.expect("destroyed"),
        async |api| delete_body = api.answer_destroy("hodei-w-1").await,
    )
    .await;
    assert_eq!(delete_body["gracePeriodSeconds"], 10);
    assert_eq!(delete_body["propagationPolicy"], "Background");
}

#[tokio::test]
async fn destroy_resyncs_when_its_watch_version_has_expired() {
    let (provider, api) = provider();
    scripted(
        provider,
        api,
        async |provider| provider.destroy("w-1").await.expect("destroyed"),
        async |api| {
            let delete = api.expect(Method::DELETE, &pod_path("hodei-w-1")).await;
            delete.reply(200, terminating(pod("hodei-w-1", "700", running())));
            let watch = api.expect(Method::GET, &pods_path()).await;
            assert_watch_of(&watch, "hodei-w-1", "700");
            let expired = failure_status(410, "Expired", "too old resource version: 700 (950)", "", "");
            watch.reply_events(&[("ERROR", expired)]);
            // The provider reads the pod as it is now: gone.
            api.expect(Method::GET, &pod_path("hodei-w-1")).await.reply(404, not_found("hodei-w-1", "pods"));
            api.expect(Method::DELETE, &config_map_path("hodei-w-1-ca"))
                .await
                .reply(200, success_status("hodei-w-1-ca", "configmaps"));
        },
    )
    .await;
}

#[tokio::test]
async fn provisioning_resyncs_when_the_watch_request_itself_is_gone() {
    let spec = WorkerSpec::new("w-1", agent_env());
    let info = provision_scripted(&spec, async |api| {
        api.answer_creates().await;
        let watch = api.expect(Method::GET, &pods_path()).await;
        assert_watch_of(&watch, "hodei-w-1", "101");
        watch.reply(410, failure_status(410, "Expired", "too old resource version: 101 (480)", "", ""));
        // Read as it is now, still pending; then watched from that version.
        api.expect(Method::GET, &pod_path("hodei-w-1"))
            .await
            .reply(200, pod("hodei-w-1", "480", waiting("ContainerCreating", "")));
        let watch = api.expect(Method::GET, &pods_path()).await;
        assert_watch_of(&watch, "hodei-w-1", "480");
        watch.reply_events(&[("MODIFIED", pod("hodei-w-1", "481", running()))]);
    })
    .await
    .expect("provisioned");
    assert_eq!(info.state, WorkerState::Running);
}

#[tokio::test]
async fn destroying_a_worker_that_is_already_gone_succeeds() {
    let (provider, api) = provider();
    scripted(
        provider,
        api,
        async |provider| provider.destroy("w-gone").await.expect("a missing worker is not an error"),
        async |api| api.answer_destroy_of_missing("hodei-w-gone").await,
    )
    .await;
}

#[tokio::test]
async fn orphans_are_listed_by_label_and_each_is_reaped() {
    let (provider, api) = provider();
    let mut running_orphan = pod("hodei-w-a", "300", running());
    running_orphan["metadata"]["labels"][SAGA_ID_LABEL] = json!("nightly-2026-release-0a1b2c3d");
    running_orphan["metadata"]["annotations"] =
        json!({SAGA_ID_LABEL: "nightly/2026 release", WORKER_ID_LABEL: "w-a"});
    let oom_killed = pod(
        "hodei-w-b",
        "301",
        scheduled_with(
            "Failed",
            json!({"terminated": {"exitCode": 137, "reason": "OOMKilled",
                "startedAt": "2026-12-01T10:00:03Z", "finishedAt": "2026-12-01T10:09:00Z"}}),
        ),
    );
    let config_map = |worker: &str| {
        json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {
            "name": format!("hodei-{worker}-ca"), "namespace": NAMESPACE, "resourceVersion": "299",
            "labels": {"hodei.dev/managed-by": "hodei", "hodei.dev/worker-id": worker},
            "annotations": {WORKER_ID_LABEL: worker},
        }, "data": {"ca.pem": "pem"}})
    };

    let listed = scripted(
        provider,
        api,
        async |provider| {
            let listed = provider.list().await.expect("listed");
            for worker in &listed {
                provider.destroy(&worker.worker_id).await.expect("reaped");
            }
            listed
        },
        async |api| {
            let pods = api.expect(Method::GET, &pods_path()).await;
            assert_eq!(
                pods.query.get("labelSelector").map(String::as_str),
                Some("hodei.dev/managed-by=hodei")
            );
            assert!(!pods.query.contains_key("watch"));
            pods.reply(200, list_of("PodList", vec![running_orphan, oom_killed]));
            let maps = api.expect(Method::GET, &config_maps_path()).await;
            assert_eq!(
                maps.query.get("labelSelector").map(String::as_str),
                Some("hodei.dev/managed-by=hodei")
            );
            maps.reply(
                200,
                list_of("ConfigMapList", vec![config_map("w-a"), config_map("w-b"), config_map("w-lone")]),
            );
            api.answer_destroy("hodei-w-a").await;
            api.answer_destroy("hodei-w-b").await;
            // The ConfigMap of a start that never created its pod.
            api.expect(Method::DELETE, &pod_path("hodei-w-lone"))
                .await
                .reply(404, not_found("hodei-w-lone", "pods"));
            api.expect(Method::DELETE, &config_map_path("hodei-w-lone-ca"))
                .await
                .reply(200, success_status("hodei-w-lone-ca", "configmaps"));
        },
    )
    .await;

    let summary: Vec<(&str, &str, &WorkerState)> =
        listed.iter().map(|w| (w.worker_id.as_str(), w.handle.as_str(), &w.state)).collect();
    assert_eq!(
        summary,
        [
            ("w-a", "hodei-w-a", &WorkerState::Running),
            (
                "w-b",
                "hodei-w-b",
                &WorkerState::Exited { code: Some(137), reason: Some("OOMKilled".to_owned()) }
            ),
            ("w-lone", "hodei-w-lone-ca", &WorkerState::Gone),
        ]
    );
    // The saga id comes back whole, so the scheduler can tell a live saga's worker.
    assert_eq!(listed[0].labels[SAGA_ID_LABEL], "nightly/2026 release");
}

/// At start, the scheduler lists the provider's workers: a live saga's pod is adopted (its saga
/// id, not a valid label value, comes back whole from the annotation), the rest destroyed.
#[tokio::test]
async fn the_scheduler_reaps_orphan_pods_at_start_and_adopts_a_live_sagas() {
    use std::sync::Arc;

    use hodei_server::hub::{Hub, HubConfig};
    use hodei_server::pki::{HubPki, PkiConfig};
    use hodei_server::{ProviderPolicy, Scheduler};

    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(HubPki::open(&dir.path().join("hub"), PkiConfig::default()).unwrap());
    // The live saga's worker registered with this control plane before it restarted: only a
    // worker holding one of its certificates can reconnect, so only such a worker is adopted.
    let key = hodei_agent::pki::AgentKey::generate().unwrap();
    let token = pki.issue_token("w-live").unwrap();
    pki.register(token.as_str(), "w-live", &key.csr_pem("w-live").unwrap()).unwrap();
    let hub = Hub::new(pki, HubConfig::default());
    let (client, mut api) = fake_cluster();
    let provider = Arc::new(KubernetesProvider::new(client, config()));
    let unused: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    // Idle workers are kept far longer than the test, so that the adopted one is not destroyed
    // behind the script's back.
    let scheduler = Scheduler::builder(hub, unused, unused)
        .provider(provider, ProviderPolicy::new().reuse_for(Duration::from_secs(3600)))
        .build()
        .unwrap();

    let mut live = pod("hodei-w-live", "300", running());
    live["metadata"]["labels"][SAGA_ID_LABEL] = json!("nightly-2026-release-0a1b2c3d");
    live["metadata"]["annotations"] =
        json!({SAGA_ID_LABEL: "nightly/2026 release", WORKER_ID_LABEL: "w-live"});
    let mut dead = pod("hodei-w-dead", "301", running());
    dead["metadata"]["labels"][SAGA_ID_LABEL] = json!("finished-saga");
    let script = async {
        let pods = api.expect(Method::GET, &pods_path()).await;
        assert_eq!(pods.query.get("labelSelector").map(String::as_str), Some("hodei.dev/managed-by=hodei"));
        pods.reply(200, list_of("PodList", vec![live, dead]));
        api.expect(Method::GET, &config_maps_path()).await.reply(200, list_of("ConfigMapList", vec![]));
        api.answer_destroy("hodei-w-dead").await;
    };
    let (report, ()) = tokio::time::timeout(LIMIT, async {
        tokio::join!(scheduler.reap_orphans(|saga| saga == "nightly/2026 release"), script)
    })
    .await
    .expect("reaped");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.adopted, ["w-live"]);
    assert_eq!(report.destroyed, ["w-dead"]);
}

#[tokio::test]
async fn api_errors_carry_the_api_servers_reason_and_message() {
    let (provider, api) = provider();
    let spec = WorkerSpec::new("w-1", agent_env());
    let forbidden = "pods \"hodei-w-1\" is forbidden: User \"system:serviceaccount:ci:hodei\" cannot create \
                     resource \"pods\" in API group \"\" in the namespace \"ci\"";
    let (provisioned, listed) = scripted(
        provider,
        api,
        async |provider| (provider.provision(&spec).await, provider.list().await),
        async |api| {
            let config_map = api.expect(Method::POST, &config_maps_path()).await;
            let body = config_map.body.clone();
            config_map.reply(201, created(body, "100"));
            api.expect(Method::POST, &pods_path())
                .await
                .reply(403, failure_status(403, "Forbidden", forbidden, "hodei-w-1", "pods"));
            // No pod was made: only the ConfigMap is removed.
            api.expect(Method::DELETE, &config_map_path("hodei-w-1-ca"))
                .await
                .reply(200, success_status("hodei-w-1-ca", "configmaps"));
            api.expect(Method::GET, &pods_path()).await.reply(
                500,
                failure_status(500, "InternalError", "etcdserver: request timed out", "", "pods"),
            );
        },
    )
    .await;
    match provisioned.expect_err("RBAC forbids it") {
        ProviderError::InvalidSpec { reason, .. } => {
            assert!(reason.contains("Forbidden (403)") && reason.contains(forbidden), "{reason}")
        }
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
    let error = listed.expect_err("the API server failed");
    assert!(error.is_retryable());
    let text = error.to_string();
    assert!(text.contains("InternalError (500): etcdserver: request timed out"), "{text}");
}

#[tokio::test]
async fn a_worker_id_in_use_is_refused_without_touching_the_other_workers_objects() {
    let spec = WorkerSpec::new("w-1", agent_env());
    let error = provision_scripted(&spec, async |api| {
        api.expect(Method::POST, &config_maps_path()).await.reply(
            409,
            failure_status(
                409,
                "AlreadyExists",
                "configmaps \"hodei-w-1-ca\" already exists",
                "hodei-w-1-ca",
                "configmaps",
            ),
        );
    })
    .await
    .expect_err("in use");
    assert!(matches!(&error, ProviderError::InvalidSpec { reason, .. } if reason.contains("already exists")));
}

#[tokio::test]
async fn state_and_output_read_the_pod() {
    let (provider, api) = provider();
    let (oom, gone, running_state, output, missing_output) = scripted(
        provider,
        api,
        async |provider| {
            (
                provider.state("w-b").await,
                provider.state("w-gone").await,
                provider.state("w-1").await,
                provider.output("w-1").await,
                provider.output("w-gone").await,
            )
        },
        async |api| {
            let ended = scheduled_with(
                "Failed",
                json!({"terminated": {"exitCode": 137, "reason": "OOMKilled",
                    "startedAt": "2026-12-01T10:00:03Z", "finishedAt": "2026-12-01T10:09:00Z"}}),
            );
            api.expect(Method::GET, &pod_path("hodei-w-b")).await.reply(200, pod("hodei-w-b", "301", ended));
            api.expect(Method::GET, &pod_path("hodei-w-gone"))
                .await
                .reply(404, not_found("hodei-w-gone", "pods"));
            api.expect(Method::GET, &pod_path("hodei-w-1"))
                .await
                .reply(200, pod("hodei-w-1", "302", running()));
            api.answer_logs("hodei-w-1", "registered\nsession open\n").await;
            api.expect(Method::GET, &format!("{}/log", pod_path("hodei-w-gone")))
                .await
                .reply(404, not_found("hodei-w-gone", "pods"));
        },
    )
    .await;
    assert_eq!(oom.unwrap(), WorkerState::Exited { code: Some(137), reason: Some("OOMKilled".to_owned()) });
    assert_eq!(gone.unwrap(), WorkerState::Gone);
    assert_eq!(running_state.unwrap(), WorkerState::Running);
    assert_eq!(output.unwrap(), "registered\nsession open\n");
    assert!(
        matches!(missing_output, Err(ProviderError::NotFound { worker_id, .. }) if worker_id == "w-gone")
    );
}

#[tokio::test]
async fn invalid_specs_are_refused_before_any_request() {
    let (provider, api) = provider();
    let bad = |edit: &dyn Fn(&mut WorkerSpec)| {
        let mut spec = WorkerSpec::new("w-1", agent_env());
        edit(&mut spec);
        spec
    };
    let specs = [
        bad(&|spec| spec.resources = Resources::new(Some(0), None)),
        bad(&|spec| spec.resources = Resources::new(None, Some(0))),
        bad(&|spec| {
            spec.labels.insert("not a key".to_owned(), "x".to_owned());
        }),
        bad(&|spec| {
            spec.provider_config.insert("tolerations".to_owned(), "{not json".to_owned());
        }),
        bad(&|spec| {
            spec.provider_config.insert("active_deadline_seconds".to_owned(), "soon".to_owned());
        }),
        bad(&|spec| {
            spec.provider_config.insert("node_selector".to_owned(), "disktype".to_owned());
        }),
        bad(&|spec| {
            spec.provider_config.insert("service_account".to_owned(), "Not_Valid".to_owned());
        }),
    ];
    let errors = scripted(
        provider,
        api,
        async |provider| {
            let mut errors = Vec::new();
            for spec in &specs {
                errors.push(provider.provision(spec).await.expect_err("refused"));
            }
            errors
        },
        async |_| {},
    )
    .await;
    for error in errors {
        assert!(matches!(error, ProviderError::InvalidSpec { .. }), "{error:?}");
    }
}

/// Against a real cluster: a kubeconfig, the agent image `hodei-agent:test` on the nodes, and
/// `HODEI_K8S_HUB_HOST`, an address of this machine the pods reach. Ignored unless asked for,
/// so that it is counted as ignored, never as passed; asked for, a missing piece fails it.
#[tokio::test]
#[ignore = "needs a real cluster: HODEI_K8S_HUB_HOST=<ip> cargo test -p hodei-providers --features kubernetes --test kubernetes -- --ignored real_cluster"]
async fn real_cluster_end_to_end() {
    let cluster = real_cluster::Cluster::from_env().await;
    cluster.provision_run_and_destroy().await;
}

mod real_cluster {
    use std::sync::Arc;

    use hodei_agent::protocol::v1::{self, job_result::Outcome};
    use hodei_providers::kubernetes::{KubernetesConfig, KubernetesProvider};
    use hodei_providers::{AgentEnv, Provider, WorkerSpec, WorkerState};
    use hodei_server::hub::{Hub, HubConfig};
    use hodei_server::pki::{HubPki, PkiConfig};
    use tokio::net::TcpListener;

    use super::kubernetes_support::AGENT_IMAGE;

    const WAIT: std::time::Duration = std::time::Duration::from_secs(180);

    pub struct Cluster {
        provider: KubernetesProvider,
        hub_host: String,
    }

    impl Cluster {
        /// The cluster the kubeconfig names; every missing piece is a failure with its name.
        pub async fn from_env() -> Self {
            let kubeconfig = std::env::var_os("KUBECONFIG").map(std::path::PathBuf::from).or_else(|| {
                std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".kube/config"))
            });
            assert!(
                kubeconfig.is_some_and(|path| path.exists()),
                "no kubeconfig ($KUBECONFIG or ~/.kube/config)"
            );
            let hub_host = std::env::var("HODEI_K8S_HUB_HOST")
                .expect("HODEI_K8S_HUB_HOST: an IP of this machine that the cluster's pods reach");
            let namespace = std::env::var("HODEI_K8S_NAMESPACE").unwrap_or_else(|_| "default".to_owned());
            let config = KubernetesConfig::default()
                .namespace(namespace)
                .image(AGENT_IMAGE)
                .image_pull_policy("IfNotPresent");
            let provider =
                KubernetesProvider::connect(config).await.expect("the kubeconfig's cluster answers");
            Self { provider, hub_host }
        }

        pub async fn provision_run_and_destroy(&self) {
            let dir = tempfile::tempdir().unwrap();
            let pki = Arc::new(HubPki::open(&dir.path().join("hub"), PkiConfig::default()).unwrap());
            let hub = Hub::new(pki.clone(), HubConfig::default());
            let identity = pki.issue_server_identity(&[self.hub_host.as_str()]).unwrap();
            let bind = |port: u16| format!("{}:{port}", self.hub_host);
            let registration =
                hub.serve_registration(TcpListener::bind(bind(0)).await.unwrap(), &identity).unwrap();
            let sessions = hub.serve_sessions(TcpListener::bind(bind(0)).await.unwrap(), &identity).unwrap();

            let worker = format!("e2e-{}", std::process::id());
            let agent = AgentEnv::new(
                registration.local_addr().to_string(),
                sessions.local_addr().to_string(),
                pki.issue_token(&worker).unwrap().as_str(),
                pki.ca_bundle_pem(),
            );
            let spec = WorkerSpec::new(&worker, agent);
            let started = std::time::Instant::now();
            let info = tokio::time::timeout(WAIT, self.provider.provision(&spec))
                .await
                .unwrap()
                .expect("provisioned");
            let running = started.elapsed();
            assert_eq!(info.state, WorkerState::Running);
            let mut workers = hub.watch_workers();
            tokio::time::timeout(WAIT, workers.wait_for(|w| w.contains_key(&worker))).await.unwrap().unwrap();
            let registered = started.elapsed();
            let job = v1::JobSpec {
                job_id: format!("e2e/{worker}"),
                command: vec!["/hodei-agent".to_owned(), "--help".to_owned()],
                ..v1::JobSpec::default()
            };
            let result = tokio::time::timeout(WAIT, hub.run_job(&worker, job)).await.unwrap().expect("ran");
            assert_eq!(result.outcome, Some(Outcome::ExitCode(0)), "{result:?}");
            println!("pod running after {running:?}, agent registered after {registered:?}");
            tokio::time::timeout(WAIT, self.provider.destroy(&worker)).await.unwrap().expect("destroyed");
            assert_eq!(self.provider.state(&worker).await.unwrap(), WorkerState::Gone);
            let listed = self.provider.list().await.unwrap();
            assert!(listed.iter().all(|w| w.worker_id != worker), "{listed:?}");
        }
    }
}
