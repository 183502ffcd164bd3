# The C memory functions the compiler emits calls to. There is no libc in
# the firmware. Bulk copies move 32 bytes per loop iteration with plain
# 64-bit moves: under TCG every iteration of a `rep movs` is a separate
# dispatch, so a chained loop of moves is several times faster (the agent
# copies up to 2 MiB per request). DF is clear everywhere we run.
.section .text.mem, "ax"
.code64

.global memcpy
memcpy:
    movq %rdi, %rax
    cmpq $32, %rdx
    jb 2f
1:  movq (%rsi), %r8
    movq 8(%rsi), %r9
    movq 16(%rsi), %r10
    movq 24(%rsi), %r11
    movq %r8, (%rdi)
    movq %r9, 8(%rdi)
    movq %r10, 16(%rdi)
    movq %r11, 24(%rdi)
    addq $32, %rsi
    addq $32, %rdi
    subq $32, %rdx
    cmpq $32, %rdx
    jae 1b
2:  movq %rdx, %rcx
    rep movsb
    ret

.global memmove
memmove:
    cmpq %rsi, %rdi
    jbe memcpy
    movq %rdi, %rax
    movq %rdx, %rcx
    leaq -1(%rsi, %rdx), %rsi
    leaq -1(%rdi, %rdx), %rdi
    std
    rep movsb
    cld
    ret

.global memset
memset:
    movq %rdi, %r9
    movzbl %sil, %eax
    movabsq $0x0101010101010101, %r8
    imulq %r8, %rax
    cmpq $32, %rdx
    jb 2f
1:  movq %rax, (%rdi)
    movq %rax, 8(%rdi)
    movq %rax, 16(%rdi)
    movq %rax, 24(%rdi)
    addq $32, %rdi
    subq $32, %rdx
    cmpq $32, %rdx
    jae 1b
2:  movq %rdx, %rcx
    rep stosb
    movq %r9, %rax
    ret

.global memcmp
.global bcmp
memcmp:
bcmp:
    xorl %eax, %eax
    testq %rdx, %rdx
    jz 2f
    movq %rdx, %rcx
    repe cmpsb
    je 2f
    movzbl -1(%rdi), %eax
    movzbl -1(%rsi), %ecx
    subl %ecx, %eax
2:  ret
