//! Measures what spec/format.md §18 records: envelope throughput of both AEADs on 256 KiB
//! chunks, keyed chunk ids against plain SHA-256, and Argon2id unlock time.
//!
//! `cargo run --release -p bkimg-format --example crypto_bench`

use std::time::Instant;

use bkimg_format::crypto::{Aead, Key, ObjectKind, RepoKeys};
use bkimg_format::keys::{Argon2Params, Secret, Slot};
use bkimg_format::Digest;

fn rate(bytes: usize, secs: f64) -> String {
    format!("{:.0} MiB/s", bytes as f64 / secs / (1 << 20) as f64)
}

fn main() {
    let keys = RepoKeys::derive(&Key::random(), "bench");
    let mut chunk = vec![0u8; 256 << 10];
    bkimg_format::crypto::fill_random(&mut chunk);
    let rounds = 800; // 200 MiB
    println!(
        "AES/PCLMUL in hardware: {}",
        Aead::preferred() == Aead::Aes256Gcm
    );
    for aead in [Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
        let t = Instant::now();
        let mut sealed = Vec::new();
        for i in 0..rounds {
            sealed = keys.seal(aead, ObjectKind::Chunk, &format!("{i:064x}"), &chunk);
        }
        let seal = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..rounds {
            keys.open(ObjectKind::Chunk, &format!("{:064x}", rounds - 1), &sealed)
                .unwrap();
        }
        let open = t.elapsed().as_secs_f64();
        println!(
            "{:18} seal {:>10}  open {:>10}",
            aead.name(),
            rate(chunk.len() * rounds, seal),
            rate(chunk.len() * rounds, open)
        );
    }
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(keys.chunk_id(&chunk));
    }
    let hmac = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(Digest::of_bytes(&chunk));
    }
    let sha = t.elapsed().as_secs_f64();
    println!(
        "chunk id: HMAC-SHA256 {}, SHA-256 {}",
        rate(chunk.len() * rounds, hmac),
        rate(chunk.len() * rounds, sha)
    );
    let master = Key::random();
    for (m, t_) in [
        (64 << 10, 3),
        (128 << 10, 2),
        (256 << 10, 2),
        (512 << 10, 1),
    ] {
        let params = Argon2Params {
            memory_kib: m,
            iterations: t_,
            parallelism: 1,
        };
        let slot = Slot::create(
            &master,
            "bench",
            "0000000000000000",
            "",
            Secret::Passphrase(b"pw"),
            params,
        )
        .unwrap();
        let t = Instant::now();
        slot.unlock(Secret::Passphrase(b"pw")).unwrap();
        println!(
            "Argon2id m={} MiB t={t_} p=1: unlock {:.2} s",
            m >> 10,
            t.elapsed().as_secs_f64()
        );
    }
}
