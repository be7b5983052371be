//! Connection upgrades (SPDY, WebSocket): answer 101 with the upstream's headers, then splice the
//! two upgraded streams.

use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::ProxyBody;
use crate::error::ProxyError;
use crate::sleep::Activity;

/// A client's side of an upgrade, with the connection slots its stream goes on holding once the
/// connection it came on hands it over (hyper ends that connection then).
pub struct ClientUpgrade {
    on: OnUpgrade,
    _slots: Option<crate::connections::Slots>,
}

/// The upgrade `req` asks for, holding its connection's slots.
pub fn client(req: &mut http::Request<hyper::body::Incoming>) -> ClientUpgrade {
    let slots = req.extensions().get::<crate::connections::Slots>().cloned();
    ClientUpgrade { on: hyper::upgrade::on(req), _slots: slots }
}

/// The answer to relay to the client for an upstream's `resp`: its upgrade spliced, or its body
/// streamed back without hop-by-hop headers. `who` names the upstream in errors.
/// Data on a spliced stream counts toward `session`'s activity when given (sleep mode: an open
/// exec session carrying data keeps the cluster awake).
pub fn relay<B>(
    resp: Response<B>,
    client_upgrade: Option<ClientUpgrade>,
    who: &str,
    session: Option<Arc<Activity>>,
) -> Result<Response<ProxyBody>, ProxyError>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::BoxError>,
{
    use http_body_util::BodyExt;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return match client_upgrade {
            Some(on) => Ok(splice(on, resp, session)),
            None => Err(ProxyError::upstream(who, "switched protocols unasked")),
        };
    }
    let (mut parts, body) = resp.into_parts();
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body.map_err(Into::into).boxed_unsync()))
}

/// Builds the 101 answer from the upstream's and splices the streams once both sides upgrade.
pub fn splice<B>(
    client: ClientUpgrade,
    mut upstream: Response<B>,
    session: Option<Arc<Activity>>,
) -> Response<ProxyBody> {
    let upstream_upgrade = hyper::upgrade::on(&mut upstream);
    let mut answer = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    if let Some(h) = answer.headers_mut() {
        *h = upstream.headers().clone();
    }
    tokio::spawn(async move {
        let ClientUpgrade { on: client, _slots } = client;
        let (client, upstream) = tokio::join!(client, upstream_upgrade);
        match (client, upstream) {
            (Ok(c), Ok(u)) => {
                let (mut c, mut u) = (Touching { io: TokioIo::new(c), session }, TokioIo::new(u));
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(error = %e, "upgraded stream ended");
                }
            }
            (c, u) => tracing::warn!(client = ?c.err(), upstream = ?u.err(), "connection upgrade failed"),
        }
    });
    answer.body(crate::empty()).expect("101 response")
}

/// The client's side of a spliced stream, touching the session's activity as data passes.
struct Touching<T> {
    io: T,
    session: Option<Arc<Activity>>,
}

impl<T> Touching<T> {
    fn touch(&self) {
        if let Some(a) = &self.session {
            a.touch();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Touching<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touching<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
