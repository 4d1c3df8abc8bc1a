#![no_main]
//! Every pure NBD parser on arbitrary bytes: errors are fine, panics are not.

use libfuzzer_sys::fuzz_target;
use volmig_frontends::nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    let _ = parse_request(data);
    let _ = parse_simple_reply(data);
    let _ = parse_chunk_header(data);
    let _ = parse_error_payload(data);
    let _ = parse_offset_data(data);
    let _ = parse_offset_hole(data);
    let _ = parse_block_status_payload(data);
    let _ = parse_option_header(data);
    let _ = parse_option_reply_header(data);
    let _ = parse_greeting(data);
    let _ = parse_info_request(data);
    let _ = parse_meta_context_request(data);
    let _ = parse_meta_context_reply(data);
    let _ = parse_server_reply(data);
    let _ = parse_info_reply(data);
});
