//! Linux smoke tests with Debian's cloud kernel (fetched by
//! resources/scripts/get-linux-kernel.sh). On these machines a full Linux boot cannot finish
//! (see shared/host.md), so the ELF boot is checked up to the banner and the early boot lines
//! (e820, ACPI), and the bzImage by what the loader placed in memory.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn image(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("resources/images")
        .join(name);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("EMBER_SKIP_LINUX_TESTS").as_deref() == Ok("1") {
        eprintln!(
            "!!! {} is missing: SKIPPING because EMBER_SKIP_LINUX_TESTS=1",
            p.display()
        );
        return None;
    }
    panic!(
        "{} is missing: run resources/scripts/get-linux-kernel.sh (or set EMBER_SKIP_LINUX_TESTS=1)",
        p.display()
    );
}

#[test]
fn linux_elf_boots_to_banner_e820_and_acpi() {
    if !require_kvm() {
        return;
    }
    let Some(vmlinux) = image("vmlinux") else {
        return;
    };
    let dir = TempDir::new("linux");
    let boot_args = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 nomodule \
                     i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": vmlinux,
            "boot_args": boot_args
        },
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}
    });
    let cfg_path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let mut child = spawn(&["--no-api", "--config-file", cfg_path.to_str().unwrap()]);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // The command line as the kernel received it, and every ACPI table ember builds (RSDP ->
    // XSDT -> FADT -> DSDT, MADT), each found by the kernel and carrying ember's OEM id.
    let command_line = format!("Command line: {boot_args}");
    let wanted = [
        "Linux version 6.1",
        command_line.as_str(),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "ACPI: RSDP 0x00000000000E0000",
    ];
    let tables = ["RSDP", "XSDT", "FACP", "DSDT", "APIC"];
    let mut seen_tables = vec![false; tables.len()];
    let mut seen = vec![false; wanted.len()];
    let mut log = String::new();
    // A hang guard, not a performance figure: the banner takes ~20 s on these machines.
    let deadline = Instant::now() + Duration::from_secs(150);
    while !(seen.iter().all(|s| *s) && seen_tables.iter().all(|s| *s)) && Instant::now() < deadline
    {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                for (i, w) in wanted.iter().enumerate() {
                    seen[i] |= line.contains(w);
                }
                // "ACPI: XSDT 0x... (v01 EMBER  EMBERVM  00000001 ...)"
                for (i, t) in tables.iter().enumerate() {
                    seen_tables[i] |=
                        line.contains(&format!("ACPI: {t} 0x")) && line.contains("EMBER");
                }
                log.push_str(&line);
                log.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("ember exited early ({status}); console so far:\n{log}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Stop the VM the way an orchestrator would.
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    for (w, s) in wanted.iter().zip(&seen) {
        assert!(*s, "{w:?} never appeared on the console:\n{log}");
    }
    for (t, s) in tables.iter().zip(&seen_tables) {
        assert!(
            *s,
            "no \"ACPI: {t}\" line with OEM id EMBER on the console:\n{log}"
        );
    }
    assert_eq!(status.code(), Some(0), "SIGTERM should be a clean stop");
}

#[test]
fn bzimage_is_loaded_with_its_setup_header() {
    let Some(vmlinuz) = image("vmlinuz") else {
        return;
    };
    let bytes = std::fs::read(&vmlinuz).unwrap();
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&ember::arch::arch_memory_regions(256 << 20)).unwrap();
    let mut f = std::fs::File::open(&vmlinuz).unwrap();
    let k = ember::arch::load_kernel(&mem, &mut f).unwrap();
    assert_eq!(k.entry.protocol, ember::arch::BootProtocol::LinuxBoot);
    assert_eq!(k.entry.entry_addr, GuestAddress(0x100000 + 0x200));

    let cmdline = "console=ttyS0 reboot=k panic=1";
    ember::arch::configure_system(
        &mem,
        &ember::arch::BootConfig {
            kernel: &k,
            cmdline,
            initrd: None,
            vcpu_count: 2,
            mmio_devices: &[],
        },
    )
    .unwrap();

    // The protected-mode kernel sits at 1 MiB, byte for byte (all of it, not a prefix).
    let setup_sects = bytes[0x1f1] as usize;
    let pm = &bytes[(setup_sects + 1) * 512..];
    let mut placed = vec![0u8; pm.len()];
    mem.read_slice(&mut placed, GuestAddress(0x100000)).unwrap();
    if let Some(i) = (0..pm.len()).find(|&i| placed[i] != pm[i]) {
        panic!(
            "the protected-mode kernel differs at byte {i:#x} of {:#x}",
            pm.len()
        );
    }

    // The zero page: the image's setup header plus what the loader fills in.
    let zp = 0x7000u64;
    let rd32 = |off: u64| mem.read_obj::<u32>(GuestAddress(zp + off)).unwrap();
    let rd16 = |off: u64| mem.read_obj::<u16>(GuestAddress(zp + off)).unwrap();
    let rd8 = |off: u64| mem.read_obj::<u8>(GuestAddress(zp + off)).unwrap();
    assert_eq!(rd32(0x202), u32::from_le_bytes(*b"HdrS"));
    assert_eq!(rd16(0x1fe), 0xaa55, "boot_flag");
    assert_eq!(
        rd16(0x206),
        u16::from_le_bytes([bytes[0x206], bytes[0x207]]),
        "version"
    );
    assert!(rd16(0x206) >= 0x20c);
    assert_eq!(rd8(0x210), 0xff, "type_of_loader");
    assert_eq!(rd32(0x228), 0x20000, "cmd_line_ptr");
    assert_eq!(rd32(0x238) as usize, cmdline.len() + 1, "cmdline_size");
    assert_eq!(rd16(0x236) & 1, 1, "XLF_KERNEL_64");
    let mut line = vec![0u8; cmdline.len() + 1];
    mem.read_slice(&mut line, GuestAddress(0x20000)).unwrap();
    assert_eq!(&line[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(line[cmdline.len()], 0);
    assert!(rd8(0x1e8) >= 3, "e820 entries");
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(zp + 0x70)).unwrap(),
        0xe0000,
        "acpi_rsdp_addr"
    );
}
