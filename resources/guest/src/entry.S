# ember test guest: the only ring-0 code (BSP entry, AP trampoline, AP long-mode entry)
# and the static descriptor / page tables. Everything else runs at CPL 3.
#
# Ring-0 code is emulated instruction by instruction on the project's PVM hosts
# (about 1.3 M instructions/s), so it is kept to a few dozen straight-line
# instructions: no loops, no xsave family, no cmpxchg16b, no int3.

# CR0 = PG | WP | NE | ET | MP | PE  (EM clear, MP set: SSE usable)
.set EMBER_CR0, 0x80010033
# CR4 = OSXMMEXCPT | OSFXSR | PAE
.set EMBER_CR4, 0x620
.set EMBER_USER_DS, 0x1b        # GDT entry 3, RPL 3
.set EMBER_USER_CS, 0x23        # GDT entry 4, RPL 3
.set EMBER_RFLAGS, 0x3002       # IOPL = 3, IF = 0
.set EMBER_AP_STACK_SIZE, 8192
.set EMBER_MAX_APS, 63
.set EMBER_BSP_STACK_SIZE, 65536

# ---------------------------------------------------------------------------
# BSP entry: Linux 64-bit boot protocol. CPL 0, long mode, the VMM's identity
# map of the first GiB, RSI = zero page, RSP = 0x8ff0, IF = 0, CR0 = PE|PG|ET
# (EM and TS clear), and an IDT of limit 7, which holds no vector: any exception
# already ends in a triple fault, so the BSP keeps it. Every instruction here
# is emulated on PVM hosts, so there are seven: CR4 (SSE), CR3, GDT, and an
# iretq through a frame built by the assembler.
# ---------------------------------------------------------------------------
.section .text.entry, "ax"
.code64
.globl _start
_start:
    mov $EMBER_CR4, %eax
    mov %rax, %cr4
    mov $ember_pml4, %eax
    mov %rax, %cr3
    lgdt ember_gdt_ptr(%rip)
    mov $ember_bsp_iret_frame, %esp
    iretq

# First CPL-3 instructions (native from here): bsp_main(zero_page).
ember_bsp_user:
    mov %rsi, %rdi
    jmp bsp_main

# ---------------------------------------------------------------------------
# AP long-mode entry, reached from the trampoline's far jump (CS = 0x08).
# Picks its ring-3 stack with one lock xadd, then iretq to ap_main at CPL 3.
# ---------------------------------------------------------------------------
.globl ember_ap_entry64
ember_ap_entry64:
    lidt ember_idt_ptr(%rip)
    mov $1, %eax
    lock xadd %eax, ember_ap_next(%rip)     # eax = 1, 2, 3, ...
    shl $13, %rax                           # * EMBER_AP_STACK_SIZE
    add $ember_ap_stacks - 8, %rax          # top of this AP's stack, minus 8
    mov %rax, %rsp
    push $EMBER_USER_DS
    push %rax
    push $EMBER_RFLAGS
    push $EMBER_USER_CS
    push $ap_main
    iretq

# ---------------------------------------------------------------------------
# AP trampoline: real mode, copied by the BSP (at CPL 3) to a free page below
# 1 MiB; the SIPI vector is that page number. Goes straight from real mode to
# long mode (PE and PG set together), then far-jumps into the image.
# ---------------------------------------------------------------------------
.section .rodata.ember_trampoline, "a"
.code16
.globl ember_tramp_start
.globl ember_tramp_end
ember_tramp_start:
    lgdtl %cs:(ember_tramp_gdt_ptr - ember_tramp_start)
    mov $EMBER_CR4, %eax
    mov %eax, %cr4
    mov $ember_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx           # EFER
    mov $0x100, %eax                # LME
    xor %edx, %edx
    wrmsr
    mov $EMBER_CR0, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ember_ap_entry64
ember_tramp_gdt_ptr:
    .word ember_gdt_end - ember_gdt - 1
    .long ember_gdt
ember_tramp_end:
.code64

# ---------------------------------------------------------------------------
# Descriptor tables.
# ---------------------------------------------------------------------------
.section .data.ember_desc, "aw"
.balign 16
.globl ember_gdt
ember_gdt:
    .quad 0                         # 0x00 null
    .quad 0x00af9b000000ffff        # 0x08 kernel code, 64-bit
    .quad 0x00cf93000000ffff        # 0x10 kernel data
    .quad 0x00cff3000000ffff        # 0x18 user data, DPL 3
    .quad 0x00affb000000ffff        # 0x20 user code, 64-bit, DPL 3
ember_gdt_end:
.balign 8
    .word 0, 0, 0
ember_gdt_ptr:
    .word ember_gdt_end - ember_gdt - 1
    .quad ember_gdt
.balign 8
    .word 0, 0, 0
# Limit 0: any exception or interrupt vector is out of bounds, so the CPU
# escalates to a double and then a triple fault (shutdown). That is the
# guest's panic path.
ember_idt_ptr:
    .word 0
    .quad 0
# iretq frame of the BSP's first entry to CPL 3.
.balign 8
ember_bsp_iret_frame:
    .quad ember_bsp_user                # RIP
    .quad EMBER_USER_CS                 # CS
    .quad EMBER_RFLAGS                  # RFLAGS
    .quad ember_bsp_stack_top - 8       # RSP (ABI: rsp+8 16-byte aligned at entry)
    .quad EMBER_USER_DS                 # SS
.balign 4
ember_ap_next:
    .long 1

# ---------------------------------------------------------------------------
# Page tables, built by the assembler: identity map of 0 .. 8 GiB with 2 MiB
# pages, all USER | RW | PRESENT. The MMIO hole 3..4 GiB is also PCD | PWT.
# ---------------------------------------------------------------------------
.section .data.ember_pagetables, "aw"
.balign 4096
.globl ember_pml4
ember_pml4:
    .quad ember_pdpt + 0x7
    .fill 511, 8, 0
ember_pdpt:
    .set ember_i, 0
    .rept 8
    .quad ember_pd + ember_i * 4096 + 0x7
    .set ember_i, ember_i + 1
    .endr
    .fill 504, 8, 0
ember_pd:
    .set ember_a, 0
    .rept 4096
    .if (ember_a >= 0xc0000000) && (ember_a < 0x100000000)
    .quad ember_a + 0x9f            # PS | PCD | PWT | US | RW | P
    .else
    .quad ember_a + 0x87            # PS | US | RW | P
    .endif
    .set ember_a, ember_a + 0x200000
    .endr

# ---------------------------------------------------------------------------
# Ring-3 stacks (not in the file: zero-filled by the ELF's memsz).
# ---------------------------------------------------------------------------
.section .bss.ember_stacks, "aw", @nobits
.balign 4096
ember_bsp_stack:
    .skip EMBER_BSP_STACK_SIZE
.globl ember_bsp_stack_top
ember_bsp_stack_top:
.globl ember_ap_stacks
ember_ap_stacks:
    .skip EMBER_AP_STACK_SIZE * EMBER_MAX_APS
.globl ember_ap_stacks_end
ember_ap_stacks_end:
.text
