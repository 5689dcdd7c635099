//! A tonic gRPC client for the HTTP/2 e2e tests (a second implementation beside
//! grpcio): calls `echo.Echo` methods with raw-bytes messages and prints one
//! JSON line per call: `{"call", "code", "message", "result"}`.
//!
//! usage: tonic-grpc-client URI CALL... (unary forbidden chat expand)

use bytes::{Buf, BufMut};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Endpoint;

/// Messages are the bytes as they are.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

fn show(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let uri = args.next().ok_or("usage: tonic-grpc-client URI CALL...")?;
    let channel = Endpoint::from_shared(uri)?.connect().await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    for call in args {
        grpc.ready().await?;
        let path = |m: &str| -> Result<_, Box<dyn std::error::Error>> {
            Ok(format!("/echo.Echo/{m}").parse()?)
        };
        let result: Result<String, Status> = match call.as_str() {
            "unary" | "forbidden" => {
                let m = if call == "unary" {
                    "Unary"
                } else {
                    "Forbidden"
                };
                grpc.unary(tonic::Request::new(b"hi".to_vec()), path(m)?, Raw)
                    .await
                    .map(|r| show(r.get_ref()))
            }
            "expand" => {
                match grpc
                    .server_streaming(tonic::Request::new(b"x".to_vec()), path("Expand")?, Raw)
                    .await
                {
                    Ok(r) => {
                        let mut s = r.into_inner();
                        let mut all = Vec::new();
                        loop {
                            match s.message().await {
                                Ok(Some(m)) => all.push(show(&m)),
                                Ok(None) => break Ok(all.join(",")),
                                Err(e) => break Err(e),
                            }
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            "chat" => {
                let msgs = tokio_stream::iter(vec![b"1".to_vec(), b"2".to_vec()]);
                match grpc
                    .streaming(tonic::Request::new(msgs), path("Chat")?, Raw)
                    .await
                {
                    Ok(r) => {
                        let mut s = r.into_inner();
                        let mut all = Vec::new();
                        loop {
                            match s.message().await {
                                Ok(Some(m)) => all.push(show(&m)),
                                Ok(None) => break Ok(all.join(",")),
                                Err(e) => break Err(e),
                            }
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            other => return Err(format!("unknown call {other}").into()),
        };
        let line = match result {
            Ok(r) => serde_json::json!({"call": call, "code": "Ok", "result": r}),
            Err(s) => serde_json::json!({
                "call": call,
                "code": format!("{:?}", s.code()),
                "message": s.message(),
            }),
        };
        println!("{line}");
    }
    Ok(())
}
