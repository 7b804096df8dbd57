// Package luksfmt reads and writes LUKS1 and LUKS2 metadata, byte-compatible
// with cryptsetup 2.6 and QEMU. It knows nothing about the block graph: the
// metadata device is an io.ReaderAt (and, for updates, an io.WriterAt). That
// device is either the volume itself (embedded header) or a separate one
// (detached header, cryptsetup --header, QEMU's "header" option); the
// payload then lies on the data device at PayloadOffset, 0 for detached
// headers made by cryptsetup or QEMU.
//
// # Use
//
//	h, err := luksfmt.Open(dev, size)                 // LUKS1 or LUKS2
//	key, slot, err := h.Unlock(ctx, passphrase, luksfmt.AnySlot, luksfmt.KDFLimits{})
//	c, err := blockcrypto.New(h.CipherSpec(), key)    // payload cipher
//	luksfmt.Wipe(key)
//
// The payload is encrypted in sectors of SectorSize bytes starting at
// PayloadOffset; the IV of the sector at payload byte offset off is
// off/512 + IVTweak (512-byte units even for 4096-byte sectors, as dm-crypt
// does for LUKS2). Create makes new headers (QEMU's LUKS1 layout, or
// cryptsetup's LUKS2 layout); AddKey, KillSlot, RemoveKey, ChangeKey and
// Erase manage keyslots; Info gives QEMU's format-specific summary.
//
// # Formats
//
// LUKS1: the phdr, 8 keyslots with PBKDF2 (sha1, sha224, sha256, sha384,
// sha512) and the AF splitter (4000 stripes), the PBKDF2 volume key digest.
// cryptsetup 1.0's unaligned keyslot layout opens, as in cryptsetup.
//
// LUKS2: both binary headers (16 KiB to 4 MiB, checksummed), the JSON
// metadata with keyslots of type luks2 (pbkdf2, argon2i, argon2id; AF
// luks1 with 4000 stripes; raw areas), pbkdf2 digests, one crypt segment
// (fixed or dynamic size, iv_tweak, sector size 512 to 4096), config and
// tokens. Open uses the valid copy with the higher sequence id and reports
// a damaged or outdated other copy (Damage, CopyStates; Repair rewrites it).
// Every update writes both copies, primary first, each invalidated before
// its JSON area is rewritten and checksummed last (cryptsetup's order), with
// the sequence id incremented. Metadata this package does not model (tokens,
// unknown members anywhere) is kept as raw JSON and written back unchanged
// in meaning; only keyslot references to removed keyslots are dropped.
//
// Refused with ErrUnsupported: mandatory requirements (such as
// online-reencrypt), reencryption keyslots, more than one segment, segment
// flags or integrity, keyslot types other than luks2, kdfs other than
// pbkdf2 and argon2, af stripes other than 4000, digests other than pbkdf2,
// unknown hashes (whirlpool, ripemd160...). Ciphers are whatever
// internal/blockcrypto implements; an unsupported cipher opens (Info works)
// but fails at Unlock with ErrUnsupported.
//
// # Safety
//
// Hostile headers get clear errors (ErrCorrupt, ErrUnsupported) before any
// large allocation or computation: header and JSON sizes are bounded
// (4 MiB), areas and offsets are checked against each other and the device
// size, key sizes are at most MaxKeySize, and KDF costs are bounded by
// MaxArgon2MemoryKiB, MaxArgon2Work and MaxPBKDF2Iterations. Unlock further
// skips keyslots whose derivation would cost more than its KDFLimits (by
// default 1 GiB of argon2 memory and an estimated 30 s on this CPU,
// measured once per process), reporting ErrKDFLimit with the limit's name
// when no other keyslot opens; it stops deriving when its context is done.
//
// Keyslot updates write new keyslot material before the header that refers
// to it; ChangeKey wipes the old material only after the header has switched
// to the new one; KillSlot wipes first and then updates the header, as
// cryptsetup does. An interrupted update thus never locks out a passphrase
// it was not removing (for ChangeKey, the old or the new one opens). When the
// writer also reads, updates first check that the header on disk is still
// the one in memory (ErrConcurrentUpdate). When it implements Sync() error
// (*os.File does), it is synced between steps whose order matters.
//
// Derived keys, split key material, decrypted keyslot areas, AF
// accumulators, PBKDF2 scratch and volume keys live in internal/keymem
// memory (outside the Go heap, locked in RAM, not in core dumps) and are
// wiped and unmapped before functions return; volume keys handed to the
// caller are key memory too, theirs to release with Wipe, which also takes
// the passphrase copies secrets.Store hands out. Passphrases are never
// copied into immutable strings (the PBKDF2 here is written for that);
// argon2's output is moved to key memory, but its working memory, inside
// golang.org/x/crypto/argon2, is left to the garbage collector. No error
// message contains a passphrase or key.
package luksfmt
