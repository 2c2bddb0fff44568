//! Builds the test guest (`resources/guest`) into `$OUT_DIR/ember-guest`.
//!
//! The guest is a `#![no_std]` x86-64 ELF linked at physical 1 MiB and entered
//! through the Linux 64-bit boot protocol. It is compiled by invoking `$RUSTC`
//! directly for the host target (x86_64-unknown-linux-gnu, the only one
//! installed), with its own linker script and without libc or start files.
//! RUSTFLAGS (e.g. `+crt-static` for the VMM) deliberately do not apply.
//!
//! The VMM embeds it with `include_bytes!(concat!(env!("OUT_DIR"), "/ember-guest"))`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

#[path = "src/seccomp/bpf_tree.rs"]
mod bpf_tree;

fn main() {
    build_guest();
    compile_seccomp();
}

/// Compiles the JSON seccomp policy into BPF for each thread kind and writes them to
/// `$OUT_DIR/seccomp.bin` as `[u32 instruction count, instructions (8 bytes each)]` for the
/// `vmm`, `api` and `vcpu` threads in that order; the binary embeds that file.
fn compile_seccomp() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let policy = manifest.join("resources/seccomp/x86_64-unknown-linux-gnu.json");
    println!("cargo:rerun-if-changed={}", policy.display());
    println!("cargo:rerun-if-changed=src/seccomp/bpf_tree.rs");
    let json =
        std::fs::read(&policy).unwrap_or_else(|e| panic!("cannot read {}: {e}", policy.display()));
    let map = bpf_tree::compile(&json)
        .unwrap_or_else(|e| panic!("invalid seccomp policy {}: {e}", policy.display()));
    let mut blob = Vec::new();
    for thread in ["vmm", "api", "vcpu"] {
        let prog = map
            .get(thread)
            .unwrap_or_else(|| panic!("the seccomp policy has no {thread:?} filter"));
        blob.extend_from_slice(&(prog.len() as u32).to_le_bytes());
        for insn in prog {
            blob.extend_from_slice(&insn.code.to_le_bytes());
            blob.push(insn.jt);
            blob.push(insn.jf);
            blob.extend_from_slice(&insn.k.to_le_bytes());
        }
    }
    std::fs::write(out_dir.join("seccomp.bin"), blob).expect("write seccomp.bin");
}

fn build_guest() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest.join("resources/guest");
    let src = guest.join("src/main.rs");
    let script = guest.join("guest.ld");
    let out = out_dir.join("ember-guest");

    println!("cargo:rerun-if-changed=build.rs");
    // A directory: cargo rescans everything below it.
    println!("cargo:rerun-if-changed=resources/guest");

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.arg(&src)
        .args([
            "--crate-name",
            "ember_guest",
            "--crate-type",
            "bin",
            "--edition",
            "2021",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args(["-C", "panic=abort"])
        .args(["-C", "relocation-model=static"])
        .args(["-C", "code-model=small"])
        .args(["-C", "opt-level=s"])
        .args(["-C", "codegen-units=1"])
        .args(["-C", "debuginfo=0"])
        .args(["-C", "force-unwind-tables=no"])
        .args(["-C", "strip=symbols"])
        .args(["-C", "link-arg=-nostartfiles"])
        .args(["-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static"])
        .args(["-C", "link-arg=-no-pie"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .args(["-C", "link-arg=-Wl,-z,norelro"])
        .args(["-C", "link-arg=-Wl,-z,max-page-size=4096"])
        .args(["-C", "link-arg=-Wl,--gc-sections"])
        .arg("-o")
        .arg(&out)
        // Keep the guest's build independent of the host build's settings.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run rustc for the guest: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        eprintln!("{stderr}");
        panic!(
            "building the test guest (resources/guest) failed: {}",
            output.status
        );
    }
    for line in stderr.lines().filter(|l| l.starts_with("warning")) {
        println!("cargo:warning=ember-guest: {line}");
    }
}
