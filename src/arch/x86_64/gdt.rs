//! The boot GDT and the segment registers derived from it.
//!
//! One table is written to guest memory at `GDT_ADDR` and the very same entries are decoded into
//! `kvm_segment`s for the BSP, so the hidden segment state always matches what the guest would
//! load itself.

use kvm_bindings::kvm_segment;

use super::loader::BootProtocol;

/// Selector of each entry: index * 8.
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;
/// Number of GDT entries (NULL, code, data, TSS).
pub const GDT_ENTRIES: usize = 4;

/// Builds a descriptor. `flags` holds the access byte in bits 0-7 and the G/DB/L/AVL nibble in
/// bits 12-15, the way they sit in the descriptor's upper dword shifted down by 8.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT for a protocol: 64-bit code for the Linux entry, flat 32-bit for PVH.
pub fn gdt_table(protocol: BootProtocol) -> [u64; GDT_ENTRIES] {
    match protocol {
        BootProtocol::LinuxBoot => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL0, exec/read, L=1, G=1
            gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL0, read/write, D/B=1, G=1
            gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
        ],
        BootProtocol::PvhBoot => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff), // flat 4 GiB 32-bit code
            gdt_entry(0xc093, 0, 0xffff_ffff), // flat 4 GiB 32-bit data
            gdt_entry(0x008b, 0, 0x67),        // minimal 32-bit TSS
        ],
    }
}

fn base(entry: u64) -> u64 {
    ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    // With G set the limit counts 4 KiB pages; KVM wants it in bytes.
    if granularity(entry) != 0 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

fn granularity(entry: u64) -> u8 {
    ((entry >> 55) & 1) as u8
}

/// Decodes a descriptor into the segment-register form KVM takes.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity(entry),
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_code_segment_is_64bit_flat() {
        let gdt = gdt_table(BootProtocol::LinuxBoot);
        let cs = kvm_segment_from_gdt(gdt[1], 1);
        assert_eq!(cs.selector, CODE_SELECTOR);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.present, cs.s, cs.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = kvm_segment_from_gdt(gdt[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.db), (DATA_SELECTOR, 3, 1));
        let tr = kvm_segment_from_gdt(gdt[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (TSS_SELECTOR, 0xb, 0));
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn pvh_segments_are_flat_32bit() {
        let gdt = gdt_table(BootProtocol::PvhBoot);
        let cs = kvm_segment_from_gdt(gdt[1], 1);
        assert_eq!((cs.l, cs.db, cs.limit, cs.base), (0, 1, 0xffff_ffff, 0));
        let tr = kvm_segment_from_gdt(gdt[3], 3);
        assert_eq!((tr.limit, tr.g), (0x67, 0));
    }

    #[test]
    fn known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0x1234_5678, 0x67), 0x1280_8b34_5678_0067);
    }
}
