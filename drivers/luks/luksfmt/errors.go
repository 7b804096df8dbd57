package luksfmt

import "errors"

// Sentinel errors. Functions wrap them with detail ("%w: keyslot 3: ...");
// test with errors.Is. No error message ever contains a passphrase or key.
// They are this package's own: the drivers map them to the block graph's
// sentinels (drivers/luks/qcrypto.GraphError).
var (
	// ErrNotLUKS means no LUKS header (neither version) was found.
	ErrNotLUKS = errors.New("not a luks header")
	// ErrCorrupt means a LUKS header was found but is damaged or violates the
	// format.
	ErrCorrupt = errors.New("corrupt luks header")
	// ErrUnsupported means the header is valid but uses something this
	// package does not implement (a cipher, hash, kdf, reencryption, a
	// mandatory requirement...).
	ErrUnsupported = errors.New("unsupported luks feature")
	// ErrKDFLimit means a keyslot's key derivation would cost more memory
	// or time than the KDFLimits allow, so it was not tried.
	ErrKDFLimit = errors.New("key derivation cost exceeds the limit")
	// ErrWrongPassphrase means no keyslot could be opened with the given
	// passphrase. Its message is QEMU's.
	ErrWrongPassphrase = errors.New("Invalid password, cannot unlock any keyslot") //nolint:staticcheck // QEMU's wording
	// ErrWrongKey means a volume key does not match the header's digest.
	ErrWrongKey = errors.New("volume key does not match the luks header")
	// ErrSlotInactive means the requested keyslot holds no key.
	ErrSlotInactive = errors.New("keyslot is not active")
	// ErrSlotActive means the requested keyslot already holds a key.
	ErrSlotActive = errors.New("keyslot is already active")
	// ErrNoFreeSlot means all keyslots are in use.
	ErrNoFreeSlot = errors.New("no free keyslot")
	// ErrNoSpace means the header has no room left for a keyslot area or for
	// the JSON metadata.
	ErrNoSpace = errors.New("no space left in the luks header")
	// ErrConcurrentUpdate means the LUKS2 header on disk changed since it was
	// opened; reopen it and retry.
	ErrConcurrentUpdate = errors.New("luks2 header was updated concurrently")
	// ErrInvalidArgument reports a bad option or parameter.
	ErrInvalidArgument = errors.New("invalid argument")
)
