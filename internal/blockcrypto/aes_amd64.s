//go:build amd64 && !purego

#include "textflag.h"

// AES kernels for XTS and CBC sector encryption.
//
// Two families:
//   - *AESNI: legacy-SSE AES-NI, 8 blocks in flight in X0-X7. Needs
//     AES-NI, SSE2 and PCLMULQDQ (which every AES-NI CPU has).
//   - *VAES:  VEX-encoded VAES on ymm registers, 16 blocks in flight in
//     Y0-Y7 (two blocks per register). Needs AVX2, VAES and VPCLMULQDQ.
//
// Common register conventions:
//   AX  round keys (16 bytes per round, see schedule.go)
//   R8  number of rounds (10, 12 or 14)
//   R10 AX + 16*(rounds-10), so rounds-9..rounds are at fixed offsets
//   X8/Y8 current round key
//
// The XTS tweak T_j of block j of a sector is T_0 * x^j in GF(2^128) with
// the little-endian convention of IEEE 1619: shift the 128-bit value left
// and fold the carry out of bit 127 back in as 0x87. The AES-NI kernels
// make a sector's first 8 tweaks in parallel from T_0 (shift + PCLMULQDQ
// reduction) and the later ones by a serial doubling on general-purpose
// registers hidden in the rounds of the batch before (see TW); the VAES
// kernels keep (T_j, T_j+1) in one ymm register and derive the tweaks of a
// whole 16-block batch from it in parallel with a shift and a VPCLMULQDQ
// reduction.
//
// The multi-sector XTS kernels take the already encrypted T_0 of each sector
// (the caller encrypts the tweaks of up to 16 sectors in one ECB batch); the
// single-sector ones (xts*1) encrypt T_0 themselves, which saves a call and
// a store-to-load round trip on the latency-bound path of a one-sector
// request. No kernel handles ciphertext stealing: sectors are whole blocks.

// Reduction constant for VPCLMULQDQ: 0x87 in the low qword of each lane.
DATA xtsPoly<>+0(SB)/8, $0x87
DATA xtsPoly<>+8(SB)/8, $0
DATA xtsPoly<>+16(SB)/8, $0x87
DATA xtsPoly<>+24(SB)/8, $0
GLOBL xtsPoly<>(SB), RODATA|NOPTR, $32

// Carry mask for the SSE2 doubling: dwords {0x87, 0, 1, 0}.
DATA xtsMask<>+0(SB)/4, $0x87
DATA xtsMask<>+4(SB)/4, $0
DATA xtsMask<>+8(SB)/4, $1
DATA xtsMask<>+12(SB)/4, $0
GLOBL xtsMask<>(SB), RODATA|NOPTR, $16

// ---------------------------------------------------------------------------
// Macros

// SETUP_KEYS loads the round-key pointer and rounds and derives R10.
#define SETUP_KEYS \
	MOVQ rk+0(FP), AX; \
	MOVQ rounds+8(FP), R8; \
	MOVQ R8, R10; \
	SHLQ $4, R10; \
	LEAQ -160(AX)(R10*1), R10

// One AES round with round key K (a memory operand) on X0-X7 or on X0.
#define SSE8(OP, K) \
	MOVOU K, X8; \
	OP X8, X0; OP X8, X1; OP X8, X2; OP X8, X3; \
	OP X8, X4; OP X8, X5; OP X8, X6; OP X8, X7

#define SSE1(OP, K) \
	MOVOU K, X8; \
	OP X8, X0

// Rounds 1..Nr on X0-X7 (round 0 already applied).
#define ROUNDS_SSE8(OP, LAST, l12, l10) \
	CMPQ R8, $12; \
	JB   l10; \
	JE   l12; \
	SSE8(OP, 16(AX)); \
	SSE8(OP, 32(AX)); \
l12: \
	SSE8(OP, -16(R10)); \
	SSE8(OP, 0(R10)); \
l10: \
	SSE8(OP, 16(R10)); \
	SSE8(OP, 32(R10)); \
	SSE8(OP, 48(R10)); \
	SSE8(OP, 64(R10)); \
	SSE8(OP, 80(R10)); \
	SSE8(OP, 96(R10)); \
	SSE8(OP, 112(R10)); \
	SSE8(OP, 128(R10)); \
	SSE8(OP, 144(R10)); \
	SSE8(LAST, 160(R10))

// Rounds 1..Nr on X0.
#define ROUNDS_SSE1(OP, LAST, l12, l10) \
	CMPQ R8, $12; \
	JB   l10; \
	JE   l12; \
	SSE1(OP, 16(AX)); \
	SSE1(OP, 32(AX)); \
l12: \
	SSE1(OP, -16(R10)); \
	SSE1(OP, 0(R10)); \
l10: \
	SSE1(OP, 16(R10)); \
	SSE1(OP, 32(R10)); \
	SSE1(OP, 48(R10)); \
	SSE1(OP, 64(R10)); \
	SSE1(OP, 80(R10)); \
	SSE1(OP, 96(R10)); \
	SSE1(OP, 112(R10)); \
	SSE1(OP, 128(R10)); \
	SSE1(OP, 144(R10)); \
	SSE1(LAST, 160(R10))

// T = T * x. Needs the carry mask in X10; clobbers X11.
#define MULX_SSE(T) \
	PSHUFD $0x13, T, X11; \
	PSRAL  $31, X11; \
	PAND   X10, X11; \
	PADDQ  T, T; \
	PXOR   X11, T

// The AES-NI XTS kernels keep two tweak buffers on the stack: 0..112(SP)
// holds the tweaks of the 8-block batch in flight, for its output
// whitening, and 128..248(SP) those of the next batch. The next batch's
// tweaks are made during the current batch's rounds, one doubling after
// each of 8 rounds, so the serial doubling chain (about 5 cycles a step)
// runs in the shadow of the AES rounds instead of in front of them.
// R12:R11 is the running tweak, 8 blocks ahead of the batch in flight.
// Doing the doublings in front of the rounds, one per block as they are
// whitened, left the kernel at 0.84x OpenSSL at 4 KiB; this way it is
// about 1.05x (bench_test.go).

// TW(off, off8) stores the running tweak (R12:R11, high:low qword) as the
// next batch's tweak at off(SP) and doubles it. The doubling runs on the
// integer ALUs, which the AES rounds leave idle, instead of competing with
// them for the vector ports. Clobbers R13 and the flags.
#define TW(off, off8) \
	MOVQ  R11, off(SP); \
	MOVQ  R12, off8(SP); \
	ADDQ  R11, R11; \
	ADCQ  R12, R12; \
	SBBQ  R13, R13; \
	ANDQ  $0x87, R13; \
	XORQ  R13, R11

// Rounds 1..Nr on X0-X7 with the next batch's tweaks made between them.
#define ROUNDS_SSE8_TW(OP, LAST, l12, l10) \
	CMPQ R8, $12; \
	JB   l10; \
	JE   l12; \
	SSE8(OP, 16(AX)); \
	SSE8(OP, 32(AX)); \
l12: \
	SSE8(OP, -16(R10)); \
	SSE8(OP, 0(R10)); \
l10: \
	SSE8(OP, 16(R10)); TW(128, 136); \
	SSE8(OP, 32(R10)); TW(144, 152); \
	SSE8(OP, 48(R10)); TW(160, 168); \
	SSE8(OP, 64(R10)); TW(176, 184); \
	SSE8(OP, 80(R10)); TW(192, 200); \
	SSE8(OP, 96(R10)); TW(208, 216); \
	SSE8(OP, 112(R10)); TW(224, 232); \
	SSE8(OP, 128(R10)); TW(240, 248); \
	SSE8(OP, 144(R10)); \
	SSE8(LAST, 160(R10))

// D = X9 * x^K, 1 <= K <= 63, with PCLMULQDQ: shift both qwords left,
// carry the low qword's top bits into the high one and reduce the high
// qword's top K bits by a carry-less multiply with 0x87 (the low qword of
// the doubling mask X10). Clobbers X12, X13.
#define MULXK_SSE(K, D) \
	MOVOU X9, D; \
	PSLLQ $K, D; \
	MOVOU X9, X12; \
	PSRLQ $(64-K), X12; \
	MOVOU X12, X13; \
	PCLMULQDQ $0x01, X10, X13; \
	PSLLDQ $8, X12; \
	PXOR  X12, D; \
	PXOR  X13, D

// XTS input whitening of block i of a sector's first batch: its tweak
// T_0 * x^i (made from X9 = T_0 independently of the others, so the first
// batch does not wait for a doubling chain) is saved at off(SP); load the
// block, xor tweak and round key 0 (X8).
#define XTS_SSE_IN1(K, off, XR) \
	MULXK_SSE(K, X11); \
	MOVOU X11, off(SP); \
	MOVOU off(SI), XR; \
	PXOR  X11, XR; \
	PXOR  X8, XR

// XTS input whitening of one block of a later batch: move its tweak from
// the next-batch buffer (noff, noff8) to the in-flight one (off), load the
// block, xor tweak and round key 0 (X8). The tweak is loaded as the two
// qwords TW stored: one 16-byte load of two 8-byte stores still in the
// store buffer cannot be forwarded and stalls until they reach the cache,
// which cost 10 % of the throughput.
#define XTS_SSE_IN(off, noff, noff8, XR) \
	MOVQ   noff(SP), X11; \
	MOVHPS noff8(SP), X11; \
	MOVOU X11, off(SP); \
	MOVOU off(SI), XR; \
	PXOR  X11, XR; \
	PXOR  X8, XR

#define XTS_SSE_OUT(off, XR) \
	MOVOU off(SP), X11; \
	PXOR  X11, XR; \
	MOVOU XR, off(DI)

// XTS_SSE_SECTOR(OP, LAST, labels...) does one sector with AES-NI: DI, SI
// at the sector, DX its length in blocks, the doubling mask in X10. It is
// entered at the top with X9 = the sector's encrypted T_0, or at Lfilled
// with the next-batch buffer holding its first 8 tweaks and R12:R11 = T_8.
// CX counts the sectors left including this one and BX points at this
// sector's T_0: when the sector is a whole number of batches and another
// follows, its last batch makes the next sector's first 8 tweaks (from
// 16(BX)) so that sector is entered at Lfilled. It ends by jumping to Lend
// with DI and SI past the sector. The label arguments keep the labels of
// each expansion distinct.
#define XTS_SSE_SECTOR(OP, LAST, Lfilled, Lloop, Lcheck, Lgo, Ltail, Ltail1, Lb12, Lb10, Lt12, Lt10, Lend) \
	MOVQ DX, R9; \
	CMPQ R9, $8; \
	JB   Ltail1; \
	MOVOU (AX), X8; \
	MOVOU X9, 0(SP); \
	MOVOU 0(SI), X0; \
	PXOR  X9, X0; \
	PXOR  X8, X0; \
	XTS_SSE_IN1(1, 16, X1); \
	XTS_SSE_IN1(2, 32, X2); \
	XTS_SSE_IN1(3, 48, X3); \
	XTS_SSE_IN1(4, 64, X4); \
	XTS_SSE_IN1(5, 80, X5); \
	XTS_SSE_IN1(6, 96, X6); \
	XTS_SSE_IN1(7, 112, X7); \
	MULXK_SSE(8, X11); \
	MOVQ X11, R11; \
	PSHUFD $0x4e, X11, X11; \
	MOVQ X11, R12; \
	JMP  Lcheck; \
Lfilled: \
	MOVQ DX, R9; \
Lloop: \
	CMPQ R9, $8; \
	JB   Ltail; \
	MOVOU (AX), X8; \
	XTS_SSE_IN(0, 128, 136, X0); \
	XTS_SSE_IN(16, 144, 152, X1); \
	XTS_SSE_IN(32, 160, 168, X2); \
	XTS_SSE_IN(48, 176, 184, X3); \
	XTS_SSE_IN(64, 192, 200, X4); \
	XTS_SSE_IN(80, 208, 216, X5); \
	XTS_SSE_IN(96, 224, 232, X6); \
	XTS_SSE_IN(112, 240, 248, X7); \
Lcheck: \
	CMPQ R9, $8; \
	JNE  Lgo; \
	CMPQ CX, $1; \
	JBE  Lgo; \
	MOVQ 16(BX), R11; \
	MOVQ 24(BX), R12; \
Lgo: \
	ROUNDS_SSE8_TW(OP, LAST, Lb12, Lb10); \
	XTS_SSE_OUT(0, X0); \
	XTS_SSE_OUT(16, X1); \
	XTS_SSE_OUT(32, X2); \
	XTS_SSE_OUT(48, X3); \
	XTS_SSE_OUT(64, X4); \
	XTS_SSE_OUT(80, X5); \
	XTS_SSE_OUT(96, X6); \
	XTS_SSE_OUT(112, X7); \
	ADDQ $128, SI; \
	ADDQ $128, DI; \
	SUBQ $8, R9; \
	JMP  Lloop; \
Ltail: \
	TESTQ R9, R9; \
	JZ   Lend; \
	MOVOU 128(SP), X9; \
Ltail1: \
	MOVOU (AX), X8; \
	MOVOU (SI), X0; \
	PXOR  X9, X0; \
	PXOR  X8, X0; \
	ROUNDS_SSE1(OP, LAST, Lt12, Lt10); \
	PXOR  X9, X0; \
	MOVOU X0, (DI); \
	MULX_SSE(X9); \
	ADDQ $16, SI; \
	ADDQ $16, DI; \
	DECQ R9; \
	JNZ  Ltail1; \
	JMP  Lend;

// XTS_SSE(OP, LAST, labels...) is the body of an AES-NI XTS function
// func(rk *byte, rounds int, dst, src, tweaks *byte, nsect, ss int)
// where tweaks holds the encrypted initial tweak T_0 of each sector.
#define XTS_SSE(OP, LAST, Lsector, Lfilled, Lloop, Lcheck, Lgo, Ltail, Ltail1, Lb12, Lb10, Lt12, Lt10, Lnext, Ldone) \
	SETUP_KEYS; \
	MOVQ dst+16(FP), DI; \
	MOVQ src+24(FP), SI; \
	MOVQ tweaks+32(FP), BX; \
	MOVQ nsect+40(FP), CX; \
	MOVQ ss+48(FP), DX; \
	MOVOU xtsMask<>(SB), X10; \
	SHRQ $4, DX; \
	TESTQ CX, CX; \
	JZ   Ldone; \
Lsector: \
	MOVOU (BX), X9; \
	XTS_SSE_SECTOR(OP, LAST, Lfilled, Lloop, Lcheck, Lgo, Ltail, Ltail1, Lb12, Lb10, Lt12, Lt10, Lnext); \
Lnext: \
	ADDQ $16, BX; \
	DECQ CX; \
	JZ   Ldone; \
	TESTQ $7, DX; \
	JZ   Lfilled; \
	JMP  Lsector; \
Ldone: \
	RET

// One round of the tweak cipher on X9 with round key K (a memory operand,
// loaded into X12 because legacy-SSE memory operands must be aligned).
#define TKS(OP, K) MOVOU K, X12; OP X12, X9

// Rounds 1..Nr of the tweak cipher on X9: keys at BX, R13 = BX + 16*(rounds-10).
#define ROUNDS_TKS(l12, l10) \
	CMPQ R8, $12; \
	JB   l10; \
	JE   l12; \
	TKS(AESENC, 16(BX)); \
	TKS(AESENC, 32(BX)); \
l12: \
	TKS(AESENC, -16(R13)); \
	TKS(AESENC, 0(R13)); \
l10: \
	TKS(AESENC, 16(R13)); \
	TKS(AESENC, 32(R13)); \
	TKS(AESENC, 48(R13)); \
	TKS(AESENC, 64(R13)); \
	TKS(AESENC, 80(R13)); \
	TKS(AESENC, 96(R13)); \
	TKS(AESENC, 112(R13)); \
	TKS(AESENC, 128(R13)); \
	TKS(AESENC, 144(R13)); \
	TKS(AESENCLAST, 160(R13))

// XTS_SSE1(OP, LAST, labels...) is the body of a single-sector AES-NI XTS
// function
// func(rk *byte, rounds int, tk, dst, src *byte, sector uint64, ss int)
// that encrypts the tweak itself with the tweak key's round keys tk.
#define XTS_SSE1(OP, LAST, Lk12, Lk10, Lfilled, Lloop, Lcheck, Lgo, Ltail, Ltail1, Lb12, Lb10, Lt12, Lt10, Lend) \
	SETUP_KEYS; \
	MOVQ tk+16(FP), BX; \
	MOVQ dst+24(FP), DI; \
	MOVQ src+32(FP), SI; \
	MOVQ R8, R13; \
	SHLQ $4, R13; \
	LEAQ -160(BX)(R13*1), R13; \
	MOVQ sector+40(FP), X9; \
	MOVOU (BX), X12; \
	PXOR X12, X9; \
	MOVOU xtsMask<>(SB), X10; \
	ROUNDS_TKS(Lk12, Lk10); \
	MOVQ ss+48(FP), DX; \
	SHRQ $4, DX; \
	MOVQ $1, CX; \
	XTS_SSE_SECTOR(OP, LAST, Lfilled, Lloop, Lcheck, Lgo, Ltail, Ltail1, Lb12, Lb10, Lt12, Lt10, Lend); \
Lend: \
	RET

// CBC_ENC_LANE xors the next plaintext block of one lane (address M) and
// round key 0 into its chaining value XR.
#define CBC_ENC_LANE(M, XR) \
	MOVOU M, X11; \
	PXOR  X8, X11; \
	PXOR  X11, XR

// VAES counterparts of SSE8/SSE1 and the round sequences: the round key
// is broadcast to both lanes of Y8.
#define V8(OP, K) \
	VBROADCASTI128 K, Y8; \
	OP Y8, Y0, Y0; OP Y8, Y1, Y1; OP Y8, Y2, Y2; OP Y8, Y3, Y3; \
	OP Y8, Y4, Y4; OP Y8, Y5, Y5; OP Y8, Y6, Y6; OP Y8, Y7, Y7

#define V1(OP, K) \
	VBROADCASTI128 K, Y8; \
	OP Y8, Y0, Y0

#define ROUNDS_V8(OP, LAST, l12, l10) \
	CMPQ R8, $12; \
	JB   l10; \
	JE   l12; \
	V8(OP, 16(AX)); \
	V8(OP, 32(AX)); \
l12: \
	V8(OP, -16(R10)); \
	V8(OP, 0(R10)); \
l10: \
	V8(OP, 16(R10)); \
	V8(OP, 32(R10)); \
	V8(OP, 48(R10)); \
	V8(OP, 64(R10)); \
	V8(OP, 80(R10)); \
	V8(OP, 96(R10)); \
	V8(OP, 112(R10)); \
	V8(OP, 128(R10)); \
	V8(OP, 144(R10)); \
	V8(LAST, 160(R10))

#define ROUNDS_V1(OP, LAST, l12, l10) \
	CMPQ R8, $12; \
	JB   l10; \
	JE   l12; \
	V1(OP, 16(AX)); \
	V1(OP, 32(AX)); \
l12: \
	V1(OP, -16(R10)); \
	V1(OP, 0(R10)); \
l10: \
	V1(OP, 16(R10)); \
	V1(OP, 32(R10)); \
	V1(OP, 48(R10)); \
	V1(OP, 64(R10)); \
	V1(OP, 80(R10)); \
	V1(OP, 96(R10)); \
	V1(OP, 112(R10)); \
	V1(OP, 128(R10)); \
	V1(OP, 144(R10)); \
	V1(LAST, 160(R10))

// D = S * x^K in each 128-bit lane, 1 <= K <= 56: shift both qwords left,
// carry the low qword's top bits into the high qword, and reduce the high
// qword's top K bits with a carry-less multiply by 0x87 (Y10). Clobbers
// Y12, Y13. S and D may be the same register.
#define MULXK(K, S, D) \
	VPSRLQ     $(64-K), S, Y12; \
	VPCLMULQDQ $0x01, Y10, Y12, Y13; \
	VPSLLDQ    $8, Y12, Y12; \
	VPSLLQ     $K, S, D; \
	VPXOR      Y12, D, D; \
	VPXOR      Y13, D, D

// Lane i of a 16-block XTS batch: tweak pair (T_2i, T_2i+1) = Y9 * x^2i,
// saved at off(SP) for the output whitening.
#define XTS_V_IN(K, off, YR) \
	MULXK(K, Y9, Y11); \
	VMOVDQU Y11, off(SP); \
	VPXOR   off(SI), Y11, YR; \
	VPXOR   Y8, YR, YR

#define XTS_V_OUT(off, YR) \
	VPXOR   off(SP), YR, YR; \
	VMOVDQU YR, off(DI)

// XTS_V_SECTOR(OP, LAST, labels...) does one sector with VAES: DI, SI at
// the sector, R9 its length in blocks, X9 its encrypted initial tweak T_0.
// It ends by jumping to Lend with DI and SI past the sector. Y9 holds
// (T_j, T_j+1) for the next block j.
#define XTS_V_SECTOR(OP, LAST, Lloop, Ltail, Lb12, Lb10, Lt12, Lt10, Lend) \
	MULXK(1, Y9, Y11); \
	VINSERTI128 $1, X11, Y9, Y9; \
Lloop: \
	CMPQ R9, $16; \
	JB   Ltail; \
	VBROADCASTI128 (AX), Y8; \
	VMOVDQU Y9, 0(SP); \
	VPXOR   0(SI), Y9, Y0; \
	VPXOR   Y8, Y0, Y0; \
	XTS_V_IN(2, 32, Y1); \
	XTS_V_IN(4, 64, Y2); \
	XTS_V_IN(6, 96, Y3); \
	XTS_V_IN(8, 128, Y4); \
	XTS_V_IN(10, 160, Y5); \
	XTS_V_IN(12, 192, Y6); \
	XTS_V_IN(14, 224, Y7); \
	MULXK(16, Y9, Y9); \
	ROUNDS_V8(OP, LAST, Lb12, Lb10); \
	XTS_V_OUT(0, Y0); \
	XTS_V_OUT(32, Y1); \
	XTS_V_OUT(64, Y2); \
	XTS_V_OUT(96, Y3); \
	XTS_V_OUT(128, Y4); \
	XTS_V_OUT(160, Y5); \
	XTS_V_OUT(192, Y6); \
	XTS_V_OUT(224, Y7); \
	ADDQ $256, SI; \
	ADDQ $256, DI; \
	SUBQ $16, R9; \
	JMP  Lloop; \
Ltail: \
	TESTQ R9, R9; \
	JZ   Lend; \
	VBROADCASTI128 (AX), Y8; \
	VMOVDQU (SI), X0; \
	VPXOR   Y9, Y0, Y0; \
	VPXOR   Y8, Y0, Y0; \
	ROUNDS_V1(OP, LAST, Lt12, Lt10); \
	VPXOR   Y9, Y0, Y0; \
	VMOVDQU X0, (DI); \
	MULXK(1, Y9, Y9); \
	ADDQ $16, SI; \
	ADDQ $16, DI; \
	DECQ R9; \
	JMP  Ltail

// XTS_V(OP, LAST, labels...) is the body of a VAES XTS function with the
// same signature as the AES-NI ones.
#define XTS_V(OP, LAST, Lsector, Lloop, Ltail, Lb12, Lb10, Lt12, Lt10, Lnext, Ldone) \
	SETUP_KEYS; \
	MOVQ dst+16(FP), DI; \
	MOVQ src+24(FP), SI; \
	MOVQ tweaks+32(FP), BX; \
	MOVQ nsect+40(FP), CX; \
	MOVQ ss+48(FP), DX; \
	VMOVDQU xtsPoly<>(SB), Y10; \
	SHRQ $4, DX; \
	TESTQ CX, CX; \
	JZ   Ldone; \
Lsector: \
	VMOVDQU (BX), X9; \
	MOVQ DX, R9; \
	XTS_V_SECTOR(OP, LAST, Lloop, Ltail, Lb12, Lb10, Lt12, Lt10, Lnext); \
Lnext: \
	ADDQ $16, BX; \
	DECQ CX; \
	JNZ  Lsector; \
Ldone: \
	VZEROUPPER; \
	RET

// One round of the tweak cipher on X9 with round key K (a memory operand).
#define TK(OP, K) OP K, X9, X9

// Rounds 1..Nr of the tweak cipher on X9: keys at BX, R13 = BX + 16*(rounds-10).
#define ROUNDS_TK(l12, l10) \
	CMPQ R8, $12; \
	JB   l10; \
	JE   l12; \
	TK(VAESENC, 16(BX)); \
	TK(VAESENC, 32(BX)); \
l12: \
	TK(VAESENC, -16(R13)); \
	TK(VAESENC, 0(R13)); \
l10: \
	TK(VAESENC, 16(R13)); \
	TK(VAESENC, 32(R13)); \
	TK(VAESENC, 48(R13)); \
	TK(VAESENC, 64(R13)); \
	TK(VAESENC, 80(R13)); \
	TK(VAESENC, 96(R13)); \
	TK(VAESENC, 112(R13)); \
	TK(VAESENC, 128(R13)); \
	TK(VAESENC, 144(R13)); \
	TK(VAESENCLAST, 160(R13))

// XTS_V1(OP, LAST, labels...) is the body of a single-sector VAES XTS
// function
// func(rk *byte, rounds int, tk, dst, src *byte, sector uint64, ss int)
// that encrypts the tweak itself (tk: the tweak key's encryption round
// keys), saving a call and a round trip through memory when a request is
// one sector.
#define XTS_V1(OP, LAST, Lk12, Lk10, Lloop, Ltail, Lb12, Lb10, Lt12, Lt10, Lend) \
	SETUP_KEYS; \
	MOVQ tk+16(FP), BX; \
	MOVQ dst+24(FP), DI; \
	MOVQ src+32(FP), SI; \
	MOVQ ss+48(FP), R9; \
	SHRQ $4, R9; \
	MOVQ R8, R13; \
	SHLQ $4, R13; \
	LEAQ -160(BX)(R13*1), R13; \
	VMOVQ sector+40(FP), X9; \
	VPXOR (BX), X9, X9; \
	VMOVDQU xtsPoly<>(SB), Y10; \
	ROUNDS_TK(Lk12, Lk10); \
	XTS_V_SECTOR(OP, LAST, Lloop, Ltail, Lb12, Lb10, Lt12, Lt10, Lend); \
Lend: \
	VZEROUPPER; \
	RET

// ---------------------------------------------------------------------------
// AES-NI kernels

// func xtsEncAESNI(rk *byte, rounds int, dst, src, tweaks *byte, nsect, ss int)
TEXT ·xtsEncAESNI(SB), NOSPLIT, $256-56
	XTS_SSE(AESENC, AESENCLAST, xea_sector, xea_filled, xea_loop, xea_check, xea_go, xea_tail, xea_tail1, xea_b12, xea_b10, xea_t12, xea_t10, xea_next, xea_done)

// func xtsDecAESNI(rk *byte, rounds int, dst, src, tweaks *byte, nsect, ss int)
TEXT ·xtsDecAESNI(SB), NOSPLIT, $256-56
	XTS_SSE(AESDEC, AESDECLAST, xda_sector, xda_filled, xda_loop, xda_check, xda_go, xda_tail, xda_tail1, xda_b12, xda_b10, xda_t12, xda_t10, xda_next, xda_done)

// func xtsEncAESNI1(rk *byte, rounds int, tk, dst, src *byte, sector uint64, ss int)
TEXT ·xtsEncAESNI1(SB), NOSPLIT, $256-56
	XTS_SSE1(AESENC, AESENCLAST, xea1_k12, xea1_k10, xea1_filled, xea1_loop, xea1_check, xea1_go, xea1_tail, xea1_tail1, xea1_b12, xea1_b10, xea1_t12, xea1_t10, xea1_end)

// func xtsDecAESNI1(rk *byte, rounds int, tk, dst, src *byte, sector uint64, ss int)
TEXT ·xtsDecAESNI1(SB), NOSPLIT, $256-56
	XTS_SSE1(AESDEC, AESDECLAST, xda1_k12, xda1_k10, xda1_filled, xda1_loop, xda1_check, xda1_go, xda1_tail, xda1_tail1, xda1_b12, xda1_b10, xda1_t12, xda1_t10, xda1_end)

// func encBlocksAESNI(rk *byte, rounds int, dst, src *byte, n int)
// ECB-encrypts n blocks (used for XTS tweaks and ESSIV IVs).
TEXT ·encBlocksAESNI(SB), NOSPLIT, $0-40
	SETUP_KEYS
	MOVQ dst+16(FP), DI
	MOVQ src+24(FP), SI
	MOVQ n+32(FP), CX

eba_loop8:
	CMPQ CX, $8
	JB   eba_tail
	MOVOU (AX), X8
	MOVOU 0(SI), X0
	MOVOU 16(SI), X1
	MOVOU 32(SI), X2
	MOVOU 48(SI), X3
	MOVOU 64(SI), X4
	MOVOU 80(SI), X5
	MOVOU 96(SI), X6
	MOVOU 112(SI), X7
	PXOR  X8, X0
	PXOR  X8, X1
	PXOR  X8, X2
	PXOR  X8, X3
	PXOR  X8, X4
	PXOR  X8, X5
	PXOR  X8, X6
	PXOR  X8, X7
	ROUNDS_SSE8(AESENC, AESENCLAST, eba_b12, eba_b10)
	MOVOU X0, 0(DI)
	MOVOU X1, 16(DI)
	MOVOU X2, 32(DI)
	MOVOU X3, 48(DI)
	MOVOU X4, 64(DI)
	MOVOU X5, 80(DI)
	MOVOU X6, 96(DI)
	MOVOU X7, 112(DI)
	ADDQ  $128, SI
	ADDQ  $128, DI
	SUBQ  $8, CX
	JMP   eba_loop8

eba_tail:
	TESTQ CX, CX
	JZ    eba_done
	MOVOU (AX), X8
	MOVOU (SI), X0
	PXOR  X8, X0
	ROUNDS_SSE1(AESENC, AESENCLAST, eba_t12, eba_t10)
	MOVOU X0, (DI)
	ADDQ  $16, SI
	ADDQ  $16, DI
	DECQ  CX
	JMP   eba_tail

eba_done:
	RET

// func cbcDecAESNI(rk *byte, rounds int, dst, src, ivs *byte, nsect, ss int)
// CBC-decrypts nsect sectors of ss bytes; ivs holds one IV per sector.
// Decryption is parallel across the blocks of a sector. dst may equal src:
// every ciphertext block a batch chains on is loaded before it is stored.
TEXT ·cbcDecAESNI(SB), NOSPLIT, $0-56
	SETUP_KEYS
	MOVQ dst+16(FP), DI
	MOVQ src+24(FP), SI
	MOVQ ivs+32(FP), BX
	MOVQ nsect+40(FP), CX
	MOVQ ss+48(FP), DX
	SHRQ $4, DX
	TESTQ CX, CX
	JZ    cda_done

cda_sector:
	MOVOU (BX), X9
	MOVQ  DX, R9

cda_loop8:
	CMPQ R9, $8
	JB   cda_tail
	MOVOU (AX), X8
	MOVOU 0(SI), X0
	MOVOU 16(SI), X1
	MOVOU 32(SI), X2
	MOVOU 48(SI), X3
	MOVOU 64(SI), X4
	MOVOU 80(SI), X5
	MOVOU 96(SI), X6
	MOVOU 112(SI), X7
	PXOR  X8, X0
	PXOR  X8, X1
	PXOR  X8, X2
	PXOR  X8, X3
	PXOR  X8, X4
	PXOR  X8, X5
	PXOR  X8, X6
	PXOR  X8, X7
	ROUNDS_SSE8(AESDEC, AESDECLAST, cda_b12, cda_b10)
	PXOR  X9, X0
	MOVOU 0(SI), X11
	PXOR  X11, X1
	MOVOU 16(SI), X11
	PXOR  X11, X2
	MOVOU 32(SI), X11
	PXOR  X11, X3
	MOVOU 48(SI), X11
	PXOR  X11, X4
	MOVOU 64(SI), X11
	PXOR  X11, X5
	MOVOU 80(SI), X11
	PXOR  X11, X6
	MOVOU 96(SI), X11
	PXOR  X11, X7
	MOVOU 112(SI), X9
	MOVOU X0, 0(DI)
	MOVOU X1, 16(DI)
	MOVOU X2, 32(DI)
	MOVOU X3, 48(DI)
	MOVOU X4, 64(DI)
	MOVOU X5, 80(DI)
	MOVOU X6, 96(DI)
	MOVOU X7, 112(DI)
	ADDQ  $128, SI
	ADDQ  $128, DI
	SUBQ  $8, R9
	JMP   cda_loop8

cda_tail:
	TESTQ R9, R9
	JZ    cda_next
	MOVOU (AX), X8
	MOVOU (SI), X0
	MOVOU X0, X12
	PXOR  X8, X0
	ROUNDS_SSE1(AESDEC, AESDECLAST, cda_t12, cda_t10)
	PXOR  X9, X0
	MOVOU X12, X9
	MOVOU X0, (DI)
	ADDQ  $16, SI
	ADDQ  $16, DI
	DECQ  R9
	JMP   cda_tail

cda_next:
	ADDQ $16, BX
	DECQ CX
	JNZ  cda_sector

cda_done:
	RET

// func cbcEncAESNI(rk *byte, rounds int, dst, src, ivs *byte, nsect, ss int)
// CBC-encrypts nsect sectors of ss bytes; ivs holds one IV per sector.
// CBC encryption is serial within a sector, so groups of 8 sectors are
// encrypted side by side, one chain per register; the last nsect%8 sectors
// go one at a time.
TEXT ·cbcEncAESNI(SB), NOSPLIT, $0-56
	SETUP_KEYS
	MOVQ dst+16(FP), DI
	MOVQ src+24(FP), SI
	MOVQ ivs+32(FP), BX
	MOVQ nsect+40(FP), CX
	MOVQ ss+48(FP), DX
	LEAQ (DX)(DX*2), R11 // 3*ss
	LEAQ (DX)(DX*4), R12 // 5*ss
	LEAQ (R11)(DX*4), R13 // 7*ss

cea_group:
	CMPQ CX, $8
	JB   cea_single
	MOVOU 0(BX), X0
	MOVOU 16(BX), X1
	MOVOU 32(BX), X2
	MOVOU 48(BX), X3
	MOVOU 64(BX), X4
	MOVOU 80(BX), X5
	MOVOU 96(BX), X6
	MOVOU 112(BX), X7
	MOVQ  DX, R9
	SHRQ  $4, R9

cea_loop:
	MOVOU (AX), X8
	CBC_ENC_LANE((SI), X0)
	CBC_ENC_LANE((SI)(DX*1), X1)
	CBC_ENC_LANE((SI)(DX*2), X2)
	CBC_ENC_LANE((SI)(R11*1), X3)
	CBC_ENC_LANE((SI)(DX*4), X4)
	CBC_ENC_LANE((SI)(R12*1), X5)
	CBC_ENC_LANE((SI)(R11*2), X6)
	CBC_ENC_LANE((SI)(R13*1), X7)
	ROUNDS_SSE8(AESENC, AESENCLAST, cea_b12, cea_b10)
	MOVOU X0, (DI)
	MOVOU X1, (DI)(DX*1)
	MOVOU X2, (DI)(DX*2)
	MOVOU X3, (DI)(R11*1)
	MOVOU X4, (DI)(DX*4)
	MOVOU X5, (DI)(R12*1)
	MOVOU X6, (DI)(R11*2)
	MOVOU X7, (DI)(R13*1)
	ADDQ  $16, SI
	ADDQ  $16, DI
	DECQ  R9
	JNZ   cea_loop

	// SI and DI advanced by one sector; skip the other seven.
	ADDQ R13, SI
	ADDQ R13, DI
	ADDQ $128, BX
	SUBQ $8, CX
	JMP  cea_group

cea_single:
	TESTQ CX, CX
	JZ    cea_done
	MOVOU (BX), X0
	MOVQ  DX, R9
	SHRQ  $4, R9

cea_block:
	MOVOU (AX), X8
	CBC_ENC_LANE((SI), X0)
	ROUNDS_SSE1(AESENC, AESENCLAST, cea_t12, cea_t10)
	MOVOU X0, (DI)
	ADDQ  $16, SI
	ADDQ  $16, DI
	DECQ  R9
	JNZ   cea_block
	ADDQ  $16, BX
	DECQ  CX
	JMP   cea_single

cea_done:
	RET

// ---------------------------------------------------------------------------
// VAES kernels

// func xtsEncVAES(rk *byte, rounds int, dst, src, tweaks *byte, nsect, ss int)
TEXT ·xtsEncVAES(SB), NOSPLIT, $256-56
	XTS_V(VAESENC, VAESENCLAST, xev_sector, xev_loop, xev_tail, xev_b12, xev_b10, xev_t12, xev_t10, xev_next, xev_done)

// func xtsDecVAES(rk *byte, rounds int, dst, src, tweaks *byte, nsect, ss int)
TEXT ·xtsDecVAES(SB), NOSPLIT, $256-56
	XTS_V(VAESDEC, VAESDECLAST, xdv_sector, xdv_loop, xdv_tail, xdv_b12, xdv_b10, xdv_t12, xdv_t10, xdv_next, xdv_done)

// func xtsEncVAES1(rk *byte, rounds int, tk, dst, src *byte, sector uint64, ss int)
TEXT ·xtsEncVAES1(SB), NOSPLIT, $256-56
	XTS_V1(VAESENC, VAESENCLAST, xe1_k12, xe1_k10, xe1_loop, xe1_tail, xe1_b12, xe1_b10, xe1_t12, xe1_t10, xe1_end)

// func xtsDecVAES1(rk *byte, rounds int, tk, dst, src *byte, sector uint64, ss int)
TEXT ·xtsDecVAES1(SB), NOSPLIT, $256-56
	XTS_V1(VAESDEC, VAESDECLAST, xd1_k12, xd1_k10, xd1_loop, xd1_tail, xd1_b12, xd1_b10, xd1_t12, xd1_t10, xd1_end)

// func encBlocksVAES(rk *byte, rounds int, dst, src *byte, n int)
TEXT ·encBlocksVAES(SB), NOSPLIT, $0-40
	SETUP_KEYS
	MOVQ dst+16(FP), DI
	MOVQ src+24(FP), SI
	MOVQ n+32(FP), CX

ebv_loop16:
	CMPQ CX, $16
	JB   ebv_tail
	VBROADCASTI128 (AX), Y8
	VPXOR   0(SI), Y8, Y0
	VPXOR   32(SI), Y8, Y1
	VPXOR   64(SI), Y8, Y2
	VPXOR   96(SI), Y8, Y3
	VPXOR   128(SI), Y8, Y4
	VPXOR   160(SI), Y8, Y5
	VPXOR   192(SI), Y8, Y6
	VPXOR   224(SI), Y8, Y7
	ROUNDS_V8(VAESENC, VAESENCLAST, ebv_b12, ebv_b10)
	VMOVDQU Y0, 0(DI)
	VMOVDQU Y1, 32(DI)
	VMOVDQU Y2, 64(DI)
	VMOVDQU Y3, 96(DI)
	VMOVDQU Y4, 128(DI)
	VMOVDQU Y5, 160(DI)
	VMOVDQU Y6, 192(DI)
	VMOVDQU Y7, 224(DI)
	ADDQ $256, SI
	ADDQ $256, DI
	SUBQ $16, CX
	JMP  ebv_loop16

ebv_tail:
	TESTQ CX, CX
	JZ    ebv_done
	VBROADCASTI128 (AX), Y8
	VMOVDQU (SI), X0
	VPXOR   Y8, Y0, Y0
	ROUNDS_V1(VAESENC, VAESENCLAST, ebv_t12, ebv_t10)
	VMOVDQU X0, (DI)
	ADDQ $16, SI
	ADDQ $16, DI
	DECQ CX
	JMP  ebv_tail

ebv_done:
	VZEROUPPER
	RET

// func cbcDecVAES(rk *byte, rounds int, dst, src, ivs *byte, nsect, ss int)
// As cbcDecAESNI with 16 blocks in flight. Lane i of a batch holds blocks
// 2i and 2i+1 and chains on the ciphertext pair at 32i-16.
TEXT ·cbcDecVAES(SB), NOSPLIT, $0-56
	SETUP_KEYS
	MOVQ dst+16(FP), DI
	MOVQ src+24(FP), SI
	MOVQ ivs+32(FP), BX
	MOVQ nsect+40(FP), CX
	MOVQ ss+48(FP), DX
	SHRQ $4, DX
	TESTQ CX, CX
	JZ    cdv_done

cdv_sector:
	VMOVDQU (BX), X9
	MOVQ    DX, R9

cdv_loop16:
	CMPQ R9, $16
	JB   cdv_tail
	VBROADCASTI128 (AX), Y8
	VPXOR   0(SI), Y8, Y0
	VPXOR   32(SI), Y8, Y1
	VPXOR   64(SI), Y8, Y2
	VPXOR   96(SI), Y8, Y3
	VPXOR   128(SI), Y8, Y4
	VPXOR   160(SI), Y8, Y5
	VPXOR   192(SI), Y8, Y6
	VPXOR   224(SI), Y8, Y7
	ROUNDS_V8(VAESDEC, VAESDECLAST, cdv_b12, cdv_b10)
	VINSERTI128 $1, 0(SI), Y9, Y11
	VPXOR   Y11, Y0, Y0
	VPXOR   16(SI), Y1, Y1
	VPXOR   48(SI), Y2, Y2
	VPXOR   80(SI), Y3, Y3
	VPXOR   112(SI), Y4, Y4
	VPXOR   144(SI), Y5, Y5
	VPXOR   176(SI), Y6, Y6
	VPXOR   208(SI), Y7, Y7
	VMOVDQU 240(SI), X9
	VMOVDQU Y0, 0(DI)
	VMOVDQU Y1, 32(DI)
	VMOVDQU Y2, 64(DI)
	VMOVDQU Y3, 96(DI)
	VMOVDQU Y4, 128(DI)
	VMOVDQU Y5, 160(DI)
	VMOVDQU Y6, 192(DI)
	VMOVDQU Y7, 224(DI)
	ADDQ $256, SI
	ADDQ $256, DI
	SUBQ $16, R9
	JMP  cdv_loop16

cdv_tail:
	TESTQ R9, R9
	JZ    cdv_next
	VBROADCASTI128 (AX), Y8
	VMOVDQU (SI), X0
	VMOVDQU X0, X12
	VPXOR   Y8, Y0, Y0
	ROUNDS_V1(VAESDEC, VAESDECLAST, cdv_t12, cdv_t10)
	VPXOR   X9, X0, X0
	VMOVDQU X12, X9
	VMOVDQU X0, (DI)
	ADDQ $16, SI
	ADDQ $16, DI
	DECQ R9
	JMP  cdv_tail

cdv_next:
	ADDQ $16, BX
	DECQ CX
	JNZ  cdv_sector

cdv_done:
	VZEROUPPER
	RET

// ---------------------------------------------------------------------------
// CPU feature detection

// func cpuid(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)
TEXT ·cpuid(SB), NOSPLIT, $0-24
	MOVL eaxArg+0(FP), AX
	MOVL ecxArg+4(FP), CX
	CPUID
	MOVL AX, eax+8(FP)
	MOVL BX, ebx+12(FP)
	MOVL CX, ecx+16(FP)
	MOVL DX, edx+20(FP)
	RET

// func xgetbv() (eax, edx uint32)
TEXT ·xgetbv(SB), NOSPLIT, $0-8
	MOVL $0, CX
	XGETBV
	MOVL AX, eax+0(FP)
	MOVL DX, edx+4(FP)
	RET
