//! The Kafka frame splitter on arbitrary bytes fed in arbitrary pieces: it never panics,
//! every frame it yields is exactly the next bytes of the stream with a length prefix
//! that matches, and after an error it is not asked again (the proxy closes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_parsers::kafka::{FrameError, FrameSplitter};

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // [piece size seed][stream]
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(seed % 17) + 1;
    let mut splitter = FrameSplitter::new(MAX);
    let mut out = Vec::new();
    for chunk in stream.chunks(piece) {
        splitter.push(chunk);
        loop {
            match splitter.next_frame() {
                Ok(Some(frame)) => {
                    let wire = frame.wire();
                    let len = i32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]);
                    assert_eq!(usize::try_from(len).ok(), Some(wire.len() - 4));
                    assert!(wire.len() - 4 <= MAX);
                    assert_eq!(frame.payload().len(), wire.len() - 4);
                    out.extend_from_slice(wire);
                }
                Ok(None) => break,
                Err(FrameError::NegativeLength(_) | FrameError::TooLarge { .. }) => {
                    assert_eq!(&stream[..out.len()], &out[..]);
                    return;
                }
            }
        }
    }
    assert_eq!(&stream[..out.len()], &out[..]);
    assert_eq!(out.len() + splitter.buffered(), stream.len());
});
