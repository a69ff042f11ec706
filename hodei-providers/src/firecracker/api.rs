//! A client for the Firecracker API: HTTP/1.1 with JSON bodies on the VMM's Unix socket.
//!
//! One connection is kept for a whole configuration sequence (Firecracker keeps connections
//! alive) and dialled again if the VMM closed it. Only the requests Hodei needs are typed; the
//! bodies follow the `definitions` of Firecracker's swagger spec field for field.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

/// What a Firecracker API call can fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The API socket cannot be dialled (not there yet, or the VMM is gone).
    #[error("cannot connect to the Firecracker API socket {}: {source}", socket.display())]
    Connect {
        /// The socket dialled.
        socket: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The HTTP exchange broke down (connection reset, malformed reply).
    #[error("{method} {path} on the Firecracker API failed: {reason}")]
    Transport {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// What broke.
        reason: String,
    },
    /// Firecracker answered with an error status; `fault_message` is its own explanation.
    #[error("Firecracker rejected {method} {path} ({status}): {fault_message}")]
    Rejected {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The status it answered with.
        status: StatusCode,
        /// The `fault_message` of its error body (or the raw body if it had none).
        fault_message: String,
    },
}

/// `PUT /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MachineConfig {
    /// Number of vCPUs (Firecracker allows 1 to 32).
    pub vcpu_count: u32,
    /// Guest memory, in MiB.
    pub mem_size_mib: u64,
}

impl MachineConfig {
    /// `vcpu_count` vCPUs and `mem_size_mib` MiB.
    pub fn new(vcpu_count: u32, mem_size_mib: u64) -> Self {
        Self { vcpu_count, mem_size_mib }
    }
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BootSource {
    /// The uncompressed kernel (vmlinux) on the host.
    pub kernel_image_path: String,
    /// The kernel command line; visible on the host, so never a secret.
    pub boot_args: String,
}

impl BootSource {
    /// Boot `kernel_image_path` with `boot_args`.
    pub fn new(kernel_image_path: impl Into<String>, boot_args: impl Into<String>) -> Self {
        Self { kernel_image_path: kernel_image_path.into(), boot_args: boot_args.into() }
    }
}

/// `PUT /drives/{drive_id}`: a virtio-block drive backed by a host file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Drive {
    /// The drive's id, also the path parameter.
    pub drive_id: String,
    /// The backing file.
    pub path_on_host: String,
    /// Whether the guest boots from it.
    pub is_root_device: bool,
    /// Whether the guest may not write to it.
    pub is_read_only: bool,
}

impl Drive {
    /// The root drive `drive_id`, backed by `path_on_host`.
    pub fn root(drive_id: impl Into<String>, path_on_host: impl Into<String>, is_read_only: bool) -> Self {
        Self {
            drive_id: drive_id.into(),
            path_on_host: path_on_host.into(),
            is_root_device: true,
            is_read_only,
        }
    }
}

/// `PUT /network-interfaces/{iface_id}`: a virtio-net device backed by a host TAP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct NetworkInterface {
    /// The interface's id, also the path parameter.
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    /// The guest's MAC address; Firecracker makes one up when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

impl NetworkInterface {
    /// Interface `iface_id` on TAP `host_dev_name`.
    pub fn new(iface_id: impl Into<String>, host_dev_name: impl Into<String>) -> Self {
        Self { iface_id: iface_id.into(), host_dev_name: host_dev_name.into(), guest_mac: None }
    }
}

/// `PUT /mmds/config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MmdsConfig {
    /// `V2` makes the guest fetch a session token first (PUT), which blocks SSRF-style reads.
    pub version: String,
    /// The interfaces the guest may reach MMDS through.
    pub network_interfaces: Vec<String>,
}

impl MmdsConfig {
    /// MMDS version 2, reachable through `network_interfaces`.
    pub fn v2(network_interfaces: Vec<String>) -> Self {
        Self { version: "V2".to_owned(), network_interfaces }
    }
}

/// `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Boot the configured guest.
    InstanceStart,
    /// Ask the guest to shut down (x86: the i8042 keyboard reset; the guest must handle it).
    SendCtrlAltDel,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Self::InstanceStart => "InstanceStart",
            Self::SendCtrlAltDel => "SendCtrlAltDel",
        }
    }
}

/// `GET /`: what the VMM says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct InstanceInfo {
    /// The instance id (`--id`).
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// The Firecracker version.
    pub vmm_version: String,
}

#[derive(Deserialize)]
struct FaultBody {
    fault_message: String,
}

/// A connection to one Firecracker process's API socket.
#[derive(Debug)]
pub struct FirecrackerClient {
    socket: PathBuf,
    connection: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl FirecrackerClient {
    /// Dials the API socket at `socket`.
    pub async fn connect(socket: impl Into<PathBuf>) -> Result<Self, ApiError> {
        let socket = socket.into();
        let connection = dial(&socket).await?;
        Ok(Self { socket, connection: Mutex::new(Some(connection)) })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /`.
    pub async fn describe_instance(&self) -> Result<InstanceInfo, ApiError> {
        let path = "/";
        let body = self.request(Method::GET, path, None).await?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Transport {
            method: Method::GET,
            path: path.to_owned(),
            reason: format!("unreadable InstanceInfo: {e}"),
        })
    }

    /// `PUT /machine-config`.
    pub async fn put_machine_config(&self, config: &MachineConfig) -> Result<(), ApiError> {
        self.put("/machine-config", config).await
    }

    /// `PUT /boot-source`.
    pub async fn put_boot_source(&self, boot: &BootSource) -> Result<(), ApiError> {
        self.put("/boot-source", boot).await
    }

    /// `PUT /drives/{drive_id}`.
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), ApiError> {
        self.put(&format!("/drives/{}", drive.drive_id), drive).await
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub async fn put_network_interface(&self, iface: &NetworkInterface) -> Result<(), ApiError> {
        self.put(&format!("/network-interfaces/{}", iface.iface_id), iface).await
    }

    /// `PUT /mmds/config`.
    pub async fn put_mmds_config(&self, config: &MmdsConfig) -> Result<(), ApiError> {
        self.put("/mmds/config", config).await
    }

    /// `PUT /mmds`: replaces the whole metadata store with `contents`.
    pub async fn put_mmds(&self, contents: &serde_json::Value) -> Result<(), ApiError> {
        self.put("/mmds", contents).await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action: Action) -> Result<(), ApiError> {
        self.put("/actions", &serde_json::json!({ "action_type": action.as_str() })).await
    }

    /// `PUT path` with `body` as JSON; Firecracker answers 204 when it accepts.
    pub async fn put(&self, path: &str, body: &impl Serialize) -> Result<(), ApiError> {
        let json = serde_json::to_vec(body).map_err(|e| ApiError::Transport {
            method: Method::PUT,
            path: path.to_owned(),
            reason: format!("cannot encode the body: {e}"),
        })?;
        self.request(Method::PUT, path, Some(json)).await.map(drop)
    }

    async fn request(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, ApiError> {
        let transport =
            |reason: String| ApiError::Transport { method: method.clone(), path: path.to_owned(), reason };
        let mut builder = Request::builder().method(method.clone()).uri(path).header("host", "localhost");
        builder = builder.header("accept", "application/json");
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport(format!("cannot build the request: {e}")))?;

        let mut guard = self.connection.lock().await;
        let sender = match guard.as_mut() {
            Some(sender) if !sender.is_closed() => sender,
            _ => guard.insert(dial(&self.socket).await?),
        };
        sender.ready().await.map_err(|e| transport(e.to_string()))?;
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(e) => {
                *guard = None;
                return Err(transport(e.to_string()));
            }
        };
        drop(guard);

        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(format!("cannot read the reply: {e}")))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let fault_message = match serde_json::from_slice::<FaultBody>(&bytes) {
            Ok(fault) => fault.fault_message,
            Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        Err(ApiError::Rejected { method, path: path.to_owned(), status, fault_message })
    }
}

async fn dial(socket: &Path) -> Result<SendRequest<Full<Bytes>>, ApiError> {
    let connect_error = |source| ApiError::Connect { socket: socket.to_owned(), source };
    let stream = UnixStream::connect(socket).await.map_err(connect_error)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| connect_error(std::io::Error::other(e)))?;
    // The connection task ends when either side closes; the next request then dials again.
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "Firecracker API connection ended");
        }
    });
    Ok(sender)
}
