//! TCP between raft members: length-prefixed frames holding a bincode [`Envelope`] with
//! the raft message inside as its protobuf bytes.
//!
//! Every frame names the cluster and the sender; a frame from another cluster, for another
//! member, oversized or undecodable is refused and counted, and its connection closed.
//! Outbound traffic goes through one bounded queue per peer: when a queue is full the
//! message is dropped (raft retransmits) so the driver never blocks on a slow peer.
//! Connections are re-established with exponential backoff.

use protobuf::Message as _;
use raft::eraftpb::Message;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Largest frame accepted or sent: room for a snapshot of a large cluster state.
pub const FRAME_SIZE_MAX_BYTES: usize = 64 << 20;

/// Messages waiting for one peer. Raft sends a handful per tick per peer, more under
/// load; beyond this the peer is not keeping up and dropping is the right answer.
const PEER_QUEUE_CAPACITY: usize = 4_096;

/// Inbound connections served at once: members of a 5-member group, reconnects, and
/// room for a few strangers that will be refused.
const INBOUND_CONNECTIONS_MAX: usize = 64;

/// A connection that delivers no complete frame for this long is closed.
const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest one frame write may take before the connection is considered dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(20);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What travels in one frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub cluster_id: u64,
    pub from: u64,
    /// The sender's raft address, so a receiver can answer a member it has not met.
    pub from_address: String,
    pub to: u64,
    /// The raft message, protobuf-encoded.
    pub message: Vec<u8>,
}

/// Why an inbound frame was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    Oversized(usize),
    #[error("frame does not decode: {0}")]
    Corrupt(String),
    #[error("frame from cluster {got}, this is cluster {expected}")]
    WrongCluster { expected: u64, got: u64 },
    #[error("frame for member {got}, this is member {expected}")]
    WrongMember { expected: u64, got: u64 },
}

impl FrameError {
    fn reason(&self) -> &'static str {
        match self {
            FrameError::Oversized(_) => "oversized",
            FrameError::Corrupt(_) => "corrupt",
            FrameError::WrongCluster { .. } => "cluster_id",
            FrameError::WrongMember { .. } => "wrong_member",
        }
    }
}

fn wire() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a frame: 4-byte big-endian length, then the bincode envelope.
pub fn encode_frame(envelope: &Envelope) -> Result<Vec<u8>, String> {
    let body =
        bincode::serde::encode_to_vec(envelope, wire()).map_err(|error| error.to_string())?;
    if body.len() > FRAME_SIZE_MAX_BYTES {
        return Err(format!("frame of {} bytes is over the limit", body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks a frame body that claims to be for member `me` of cluster `cluster_id`.
pub fn decode_body(
    body: &[u8],
    cluster_id: u64,
    me: u64,
) -> Result<(Envelope, Message), FrameError> {
    let (envelope, used): (Envelope, usize) = bincode::serde::decode_from_slice(body, wire())
        .map_err(|error| FrameError::Corrupt(error.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Corrupt(format!(
            "{} trailing bytes",
            body.len() - used
        )));
    }
    if envelope.cluster_id != cluster_id {
        return Err(FrameError::WrongCluster {
            expected: cluster_id,
            got: envelope.cluster_id,
        });
    }
    if envelope.to != me {
        return Err(FrameError::WrongMember {
            expected: me,
            got: envelope.to,
        });
    }
    let message = Message::parse_from_bytes(&envelope.message)
        .map_err(|error| FrameError::Corrupt(format!("raft message: {error}")))?;
    if message.from != envelope.from || message.to != envelope.to {
        return Err(FrameError::Corrupt(
            "envelope and message disagree on from/to".into(),
        ));
    }
    Ok((envelope, message))
}

/// What the listener hands to the driver.
pub(crate) trait Inbox: Send + Sync + 'static {
    /// Delivers a message; false when the driver is gone.
    fn deliver(&self, envelope: Envelope, message: Message) -> bool;
}

/// Accepts connections until the inbox closes.
pub(crate) async fn serve(
    listener: TcpListener,
    cluster_id: u64,
    me: u64,
    inbox: std::sync::Arc<dyn Inbox>,
) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(INBOUND_CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a raft connection failed");
                tokio::time::sleep(RECONNECT_BACKOFF_MIN).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many raft connections; refusing");
            continue;
        };
        let inbox = inbox.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = read_frames(stream, cluster_id, me, inbox.as_ref()).await {
                tracing::debug!(%peer, %error, "raft connection closed");
            }
        });
    }
}

async fn read_frames(
    mut stream: TcpStream,
    cluster_id: u64,
    me: u64,
    inbox: &dyn Inbox,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut body = Vec::new();
    loop {
        let mut length = [0u8; 4];
        match tokio::time::timeout(READ_IDLE_TIMEOUT, stream.read_exact(&mut length)).await {
            Err(_) => return Err("idle".into()),
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(error)) => return Err(error.to_string()),
            Ok(Ok(_)) => {}
        }
        let length = u32::from_be_bytes(length) as usize;
        let refuse = |error: FrameError| {
            shoal_ops::metrics::metrics()
                .raft_frames_rejected_total
                .with_label_values(&[error.reason()])
                .inc();
            tracing::warn!(%error, "refused a raft frame; closing the connection");
            error.to_string()
        };
        if length > FRAME_SIZE_MAX_BYTES {
            return Err(refuse(FrameError::Oversized(length)));
        }
        body.resize(length, 0);
        match tokio::time::timeout(READ_IDLE_TIMEOUT, stream.read_exact(&mut body)).await {
            Err(_) => return Err("stalled mid-frame".into()),
            Ok(Err(error)) => return Err(format!("truncated frame: {error}")),
            Ok(Ok(_)) => {}
        }
        let (envelope, message) = decode_body(&body, cluster_id, me).map_err(refuse)?;
        if !inbox.deliver(envelope, message) {
            return Ok(());
        }
    }
}

/// The sending side of one peer: a bounded queue drained by a task that keeps a
/// connection open.
#[derive(Debug)]
pub(crate) struct PeerSender {
    queue: mpsc::Sender<Vec<u8>>,
    pub(crate) address: String,
}

impl PeerSender {
    /// Starts the task for a peer at `address` on `runtime`. It ends when this is dropped.
    pub(crate) fn start(runtime: &tokio::runtime::Handle, address: String) -> PeerSender {
        let (queue, frames) = mpsc::channel(PEER_QUEUE_CAPACITY);
        runtime.spawn(send_frames(address.clone(), frames));
        PeerSender { queue, address }
    }

    /// Queues a frame; false when it had to be dropped.
    pub(crate) fn send(&self, frame: Vec<u8>) -> bool {
        self.queue.try_send(frame).is_ok()
    }
}

async fn send_frames(address: String, mut frames: mpsc::Receiver<Vec<u8>>) {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut pending: Option<Vec<u8>> = None;
    loop {
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&address)).await;
        let mut stream = match connected {
            Ok(Ok(stream)) => stream,
            _ => {
                // While the peer is away, what is queued is stale: raft resends.
                while frames.try_recv().is_ok() {}
                if frames.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        backoff = RECONNECT_BACKOFF_MIN;
        loop {
            let frame = match pending.take() {
                Some(frame) => frame,
                None => match frames.recv().await {
                    Some(frame) => frame,
                    None => return,
                },
            };
            match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&frame)).await {
                Ok(Ok(())) => {}
                _ => {
                    tracing::debug!(%address, "raft connection lost; reconnecting");
                    pending = Some(frame);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::MessageType;

    fn envelope(cluster_id: u64, to: u64) -> Envelope {
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgHeartbeat);
        message.from = 1;
        message.to = to;
        message.term = 3;
        Envelope {
            cluster_id,
            from: 1,
            from_address: "127.0.0.1:1".into(),
            to,
            message: message.write_to_bytes().unwrap(),
        }
    }

    #[test]
    fn a_frame_round_trips() {
        let frame = encode_frame(&envelope(7, 2)).unwrap();
        let length = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(length, frame.len() - 4);
        let (decoded, message) = decode_body(&frame[4..], 7, 2).unwrap();
        assert_eq!(decoded, envelope(7, 2));
        assert_eq!(message.term, 3);
    }

    #[test]
    fn a_frame_from_another_cluster_is_refused() {
        let frame = encode_frame(&envelope(8, 2)).unwrap();
        assert_eq!(
            decode_body(&frame[4..], 7, 2).unwrap_err(),
            FrameError::WrongCluster {
                expected: 7,
                got: 8
            }
        );
    }

    #[test]
    fn a_frame_for_another_member_is_refused() {
        let frame = encode_frame(&envelope(7, 3)).unwrap();
        assert!(matches!(
            decode_body(&frame[4..], 7, 2),
            Err(FrameError::WrongMember { .. })
        ));
    }

    #[test]
    fn garbage_and_truncated_frames_are_refused_not_panicked_on() {
        let frame = encode_frame(&envelope(7, 2)).unwrap();
        for cut in 0..frame.len() - 4 {
            assert!(
                decode_body(&frame[4..4 + cut], 7, 2).is_err(),
                "cut at {cut}"
            );
        }
        assert!(decode_body(b"\xff\xff\xff\xff\xff\xff\xff\xff", 7, 2).is_err());
        let mut bad = envelope(7, 2);
        bad.message = vec![0xff; 12];
        let frame = encode_frame(&bad).unwrap();
        assert!(matches!(
            decode_body(&frame[4..], 7, 2),
            Err(FrameError::Corrupt(_))
        ));
    }
}
