//! The mock upstream of `tests/support/upstream.rs` as a process, for the Python SDK tests.
//!
//! `mock_upstream [--ready-file PATH]` binds 127.0.0.1:0, writes "127.0.0.1:PORT" to PATH
//! (atomically: a temporary file renamed into place) and serves until SIGTERM or Ctrl-C.
//! Control endpoints on the same port: `GET /__mock/requests`, `GET /__mock/in_flight`,
//! `POST /__mock/script`, `POST /__mock/reset`.

#[path = "../tests/support/upstream.rs"]
mod upstream;

use std::path::PathBuf;

fn usage() -> ! {
    eprintln!("usage: mock_upstream [--ready-file PATH]");
    std::process::exit(2);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut ready_file: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--ready-file" => ready_file = Some(args.next().unwrap_or_else(|| usage()).into()),
            "-h" | "--help" => usage(),
            other => match other.strip_prefix("--ready-file=") {
                Some(p) => ready_file = Some(p.into()),
                None => usage(),
            },
        }
    }

    let mock = upstream::MockUpstream::start().await;
    let addr = mock.addr.to_string();
    if let Some(path) = ready_file {
        let tmp = path.with_extension("tmp-mock-upstream");
        std::fs::write(&tmp, &addr).expect("write ready file");
        std::fs::rename(&tmp, &path).expect("rename ready file");
    }
    println!("mock upstream listening on {addr}");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(mock);
}
