//! Connection upgrades (SPDY, WebSocket): answer 101 with the upstream's headers, then splice the
//! two upgraded streams.

use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::ProxyBody;
use crate::error::ProxyError;

/// The answer to relay to the client for an upstream's `resp`: its upgrade spliced, or its body
/// streamed back without hop-by-hop headers. `who` names the upstream in errors.
pub fn relay<B>(
    resp: Response<B>,
    client_upgrade: Option<OnUpgrade>,
    who: &str,
) -> Result<Response<ProxyBody>, ProxyError>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::BoxError>,
{
    use http_body_util::BodyExt;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return match client_upgrade {
            Some(on) => Ok(splice(on, resp)),
            None => Err(ProxyError::upstream(who, "switched protocols unasked")),
        };
    }
    let (mut parts, body) = resp.into_parts();
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body.map_err(Into::into).boxed_unsync()))
}

/// Builds the 101 answer from the upstream's and splices the streams once both sides upgrade.
pub fn splice<B>(client: OnUpgrade, mut upstream: Response<B>) -> Response<ProxyBody> {
    let upstream_upgrade = hyper::upgrade::on(&mut upstream);
    let mut answer = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    if let Some(h) = answer.headers_mut() {
        *h = upstream.headers().clone();
    }
    tokio::spawn(async move {
        let (client, upstream) = tokio::join!(client, upstream_upgrade);
        match (client, upstream) {
            (Ok(c), Ok(u)) => {
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(error = %e, "upgraded stream ended");
                }
            }
            (c, u) => tracing::warn!(client = ?c.err(), upstream = ?u.err(), "connection upgrade failed"),
        }
    });
    answer.body(crate::empty()).expect("101 response")
}
