//! Server side of the fixed newstyle handshake (option haggling).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;
use volmig_api::io::VolumeIo;

use super::error::NbdError;
use super::proto::{self, InfoReply, OptionReplyHeader};
use super::server::{Export, ExportTable};

/// Context id the server assigns to `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What option haggling agreed on.
pub(crate) struct Negotiated<B> {
    pub export: Arc<Export<B>>,
    pub structured: bool,
    /// Context id of `base:allocation` if it was selected for this export.
    pub meta_context: Option<u32>,
}

pub(crate) enum Outcome<B> {
    /// Enter the transmission phase.
    Transmission(Negotiated<B>),
    /// The client sent NBD_OPT_ABORT (already acknowledged).
    Aborted,
}

/// Transmission flags advertised for an export.
pub(crate) fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_TRIM
        | proto::FLAG_SEND_WRITE_ZEROES
        | proto::FLAG_CAN_MULTI_CONN;
    if read_only {
        f |= proto::FLAG_READ_ONLY;
    }
    // SEND_DF must stay clear unless structured replies were negotiated.
    if structured {
        f |= proto::FLAG_SEND_DF;
    }
    f
}

struct State {
    structured: bool,
    /// Export for which `base:allocation` was selected by the last
    /// NBD_OPT_SET_META_CONTEXT, if any.
    meta_for: Option<String>,
}

async fn send_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let length = u32::try_from(data.len()).map_err(|_| NbdError::Protocol {
        detail: "option reply too large".into(),
    })?;
    let hdr = proto::encode_option_reply_header(&OptionReplyHeader {
        option,
        reply,
        length,
    });
    w.write_all(&hdr)
        .await
        .map_err(NbdError::io("sending option reply"))?;
    w.write_all(data)
        .await
        .map_err(NbdError::io("sending option reply"))
}

async fn send_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    reply: u32,
    message: &str,
) -> Result<(), NbdError> {
    debug!(
        option = proto::option_name(option),
        reply = proto::reply_name(reply),
        message,
        "rejecting option"
    );
    send_reply(w, option, reply, message.as_bytes()).await
}

async fn flush<W: AsyncWrite + Unpin>(w: &mut W) -> Result<(), NbdError> {
    w.flush()
        .await
        .map_err(NbdError::io("sending option reply"))
}

/// Run the handshake up to the transmission phase (or an abort).
///
/// Protocol violations the spec lets the server answer with an error reply
/// are answered; the ones that leave no way to answer (bad option magic,
/// unknown client flags, oversized option, unknown export for
/// NBD_OPT_EXPORT_NAME) return an error, and the caller closes the connection.
pub(crate) async fn negotiate<R, W, B>(
    r: &mut R,
    w: &mut W,
    exports: &ExportTable<B>,
) -> Result<Outcome<B>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    B: VolumeIo,
{
    w.write_all(&proto::encode_greeting(
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
    ))
    .await
    .map_err(NbdError::io("sending greeting"))?;
    flush(w).await?;

    let client_flags = r
        .read_u32()
        .await
        .map_err(NbdError::io("reading client flags"))?;
    if client_flags & !proto::KNOWN_CLIENT_FLAGS != 0 {
        return Err(NbdError::UnsupportedClientFlags {
            flags: client_flags,
        });
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;

    let mut st = State {
        structured: false,
        meta_for: None,
    };
    let mut hdr = [0u8; proto::OPTION_HEADER_SIZE];
    loop {
        r.read_exact(&mut hdr)
            .await
            .map_err(NbdError::io("reading option header"))?;
        let h = proto::parse_option_header(&hdr)?;
        if h.length > proto::MAX_OPTION_LEN {
            return Err(NbdError::OptionTooLarge {
                option: h.option,
                length: h.length,
                max: proto::MAX_OPTION_LEN,
            });
        }
        let mut payload = vec![0u8; h.length as usize];
        r.read_exact(&mut payload)
            .await
            .map_err(NbdError::io("reading option payload"))?;
        debug!(
            option = proto::option_name(h.option),
            code = h.option,
            length = h.length,
            "option"
        );

        match h.option {
            proto::OPT_EXPORT_NAME => {
                // No way to report an error: unknown export closes the session.
                let export = lookup_for_export_name(exports, &payload)?;
                let flags = transmission_flags(export.read_only, st.structured);
                let mut msg = Vec::with_capacity(10 + 124);
                msg.extend_from_slice(&export.backend.size().to_be_bytes());
                msg.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    msg.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&msg)
                    .await
                    .map_err(NbdError::io("sending export info"))?;
                flush(w).await?;
                let meta_context = meta_context_for(&st, &export);
                return Ok(Outcome::Transmission(Negotiated {
                    export,
                    structured: st.structured,
                    meta_context,
                }));
            }
            proto::OPT_ABORT => {
                // Any payload is ignored, as the spec asks.
                send_reply(w, h.option, proto::REP_ACK, &[]).await?;
                flush(w).await?;
                return Ok(Outcome::Aborted);
            }
            proto::OPT_LIST => {
                if !payload.is_empty() {
                    send_error(
                        w,
                        h.option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    )
                    .await?;
                } else {
                    for e in exports.all() {
                        let data =
                            proto::encode_server_reply(e.name.as_bytes(), e.description.as_bytes());
                        send_reply(w, h.option, proto::REP_SERVER, &data).await?;
                    }
                    send_reply(w, h.option, proto::REP_ACK, &[]).await?;
                }
            }
            proto::OPT_STARTTLS => {
                send_error(
                    w,
                    h.option,
                    proto::REP_ERR_UNSUP,
                    "TLS is not supported by this server",
                )
                .await?;
            }
            proto::OPT_EXTENDED_HEADERS => {
                send_error(
                    w,
                    h.option,
                    proto::REP_ERR_UNSUP,
                    "extended headers are not supported",
                )
                .await?;
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    send_error(
                        w,
                        h.option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    st.structured = true;
                    send_reply(w, h.option, proto::REP_ACK, &[]).await?;
                }
            }
            proto::OPT_INFO | proto::OPT_GO => {
                if let Some(export) = handle_info(w, h.option, &payload, exports, &st).await? {
                    flush(w).await?;
                    let meta_context = meta_context_for(&st, &export);
                    return Ok(Outcome::Transmission(Negotiated {
                        export,
                        structured: st.structured,
                        meta_context,
                    }));
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                handle_meta_context(w, h.option, &payload, exports, &mut st).await?;
            }
            _ => {
                send_error(w, h.option, proto::REP_ERR_UNSUP, "unsupported option").await?;
            }
        }
        flush(w).await?;
    }
}

fn lookup_for_export_name<B: VolumeIo>(
    exports: &ExportTable<B>,
    name: &[u8],
) -> Result<Arc<Export<B>>, NbdError> {
    if name.len() > proto::MAX_STRING_LEN {
        return Err(NbdError::Malformed {
            what: "NBD_OPT_EXPORT_NAME payload",
            detail: "export name longer than 4096 bytes",
        });
    }
    exports.lookup(name).ok_or_else(|| NbdError::UnknownExport {
        name: String::from_utf8_lossy(name).into_owned(),
    })
}

fn meta_context_for<B>(st: &State, export: &Export<B>) -> Option<u32> {
    match &st.meta_for {
        Some(name) if st.structured && *name == export.name => Some(BASE_ALLOCATION_ID),
        _ => None,
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO. Returns the export if a GO succeeded.
async fn handle_info<W, B>(
    w: &mut W,
    option: u32,
    payload: &[u8],
    exports: &ExportTable<B>,
    st: &State,
) -> Result<Option<Arc<Export<B>>>, NbdError>
where
    W: AsyncWrite + Unpin,
    B: VolumeIo,
{
    let req = match proto::parse_info_request(payload) {
        Ok(r) => r,
        Err(e) => {
            send_error(w, option, proto::REP_ERR_INVALID, &e.to_string()).await?;
            return Ok(None);
        }
    };
    let Some(export) = exports.lookup(req.name) else {
        let msg = format!(
            "unknown export {:?}",
            String::from_utf8_lossy(req.name).as_ref()
        );
        send_error(w, option, proto::REP_ERR_UNKNOWN, &msg).await?;
        return Ok(None);
    };

    let flags = transmission_flags(export.read_only, st.structured);
    let info = proto::encode_info_reply(&InfoReply::Export {
        size: export.backend.size(),
        flags,
    });
    send_reply(w, option, proto::REP_INFO, &info).await?;

    let mut sent_name = false;
    let mut sent_desc = false;
    for &kind in &req.requests {
        match kind {
            proto::INFO_NAME if !sent_name => {
                sent_name = true;
                let data = proto::encode_info_reply(&InfoReply::Name(export.name.as_bytes()));
                send_reply(w, option, proto::REP_INFO, &data).await?;
            }
            proto::INFO_DESCRIPTION if !sent_desc && !export.description.is_empty() => {
                sent_desc = true;
                let data = proto::encode_info_reply(&InfoReply::Description(
                    export.description.as_bytes(),
                ));
                send_reply(w, option, proto::REP_INFO, &data).await?;
            }
            // Block size is always sent below; unknown requests are ignored.
            _ => {}
        }
    }
    // Sent even if not requested (the spec allows it): clients that don't
    // understand it ignore it, and it tells the others the 32 MiB limit.
    let bs = proto::encode_info_reply(&InfoReply::BlockSize {
        min: proto::MIN_BLOCK_SIZE,
        preferred: proto::PREFERRED_BLOCK_SIZE,
        max: proto::MAX_BLOCK_SIZE,
    });
    send_reply(w, option, proto::REP_INFO, &bs).await?;
    send_reply(w, option, proto::REP_ACK, &[]).await?;

    Ok((option == proto::OPT_GO).then_some(export))
}

/// Which of the queries select `base:allocation`. `listing` enables the
/// `base:` wildcard and the empty query list (= everything).
fn selects_base_allocation(queries: &[&[u8]], listing: bool) -> bool {
    if listing && queries.is_empty() {
        return true;
    }
    queries.iter().any(|q| {
        *q == proto::META_BASE_ALLOCATION.as_bytes() || (listing && *q == b"base:".as_slice())
    })
}

async fn handle_meta_context<W, B>(
    w: &mut W,
    option: u32,
    payload: &[u8],
    exports: &ExportTable<B>,
    st: &mut State,
) -> Result<(), NbdError>
where
    W: AsyncWrite + Unpin,
    B: VolumeIo,
{
    let setting = option == proto::OPT_SET_META_CONTEXT;
    if setting {
        // Replaces earlier selections even if this request fails.
        st.meta_for = None;
        if !st.structured {
            return send_error(
                w,
                option,
                proto::REP_ERR_INVALID,
                "negotiate structured replies first",
            )
            .await;
        }
    }
    let req = match proto::parse_meta_context_request(payload) {
        Ok(r) => r,
        Err(e) => {
            return send_error(w, option, proto::REP_ERR_INVALID, &e.to_string()).await;
        }
    };
    let Some(export) = exports.lookup(req.export) else {
        let msg = format!(
            "unknown export {:?}",
            String::from_utf8_lossy(req.export).as_ref()
        );
        return send_error(w, option, proto::REP_ERR_UNKNOWN, &msg).await;
    };
    if selects_base_allocation(&req.queries, !setting) {
        // Listing replies use id 0 as the spec recommends.
        let id = if setting { BASE_ALLOCATION_ID } else { 0 };
        let data = proto::encode_meta_context_reply(id, proto::META_BASE_ALLOCATION.as_bytes());
        send_reply(w, option, proto::REP_META_CONTEXT, &data).await?;
        if setting {
            st.meta_for = Some(export.name.clone());
        }
    }
    send_reply(w, option, proto::REP_ACK, &[]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_negotiation() {
        let f = transmission_flags(false, false);
        assert_eq!(f & proto::FLAG_READ_ONLY, 0);
        assert_eq!(f & proto::FLAG_SEND_DF, 0);
        assert_ne!(f & proto::FLAG_CAN_MULTI_CONN, 0);
        let f = transmission_flags(true, true);
        assert_ne!(f & proto::FLAG_READ_ONLY, 0);
        assert_ne!(f & proto::FLAG_SEND_DF, 0);
    }

    #[test]
    fn base_allocation_query_matching() {
        assert!(selects_base_allocation(&[], true));
        assert!(!selects_base_allocation(&[], false));
        assert!(selects_base_allocation(&[b"base:"], true));
        assert!(!selects_base_allocation(&[b"base:"], false));
        assert!(selects_base_allocation(
            &[b"qemu:x", b"base:allocation"],
            false
        ));
        assert!(!selects_base_allocation(&[b"qemu:dirty-bitmap:x"], true));
    }
}
