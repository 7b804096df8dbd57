package luksfmt

import (
	"errors"

	"blockd/graph"
)

// kindError is a sentinel that also matches a graph sentinel, so callers at
// the edges (QMP, NBD) can classify luksfmt errors with errors.Is against
// either package.
type kindError struct {
	msg  string
	kind error
}

func (e *kindError) Error() string { return e.msg }

func (e *kindError) Is(target error) bool { return e.kind != nil && target == e.kind }

// Sentinel errors. Functions wrap them with detail ("%w: keyslot 3: ...");
// test with errors.Is. No error message ever contains a passphrase or key.
var (
	// ErrNotLUKS means no LUKS header (neither version) was found.
	ErrNotLUKS error = &kindError{"not a luks header", graph.ErrCorrupt}
	// ErrCorrupt means a LUKS header was found but is damaged or violates the
	// format. It matches graph.ErrCorrupt.
	ErrCorrupt error = &kindError{"corrupt luks header", graph.ErrCorrupt}
	// ErrUnsupported means the header is valid but uses something this
	// package does not implement (a cipher, hash, kdf, reencryption, a
	// mandatory requirement...). It matches graph.ErrNotSupported.
	ErrUnsupported error = &kindError{"unsupported luks feature", graph.ErrNotSupported}
	// ErrKDFLimit means a keyslot's key derivation would cost more memory
	// or time than the KDFLimits allow, so it was not tried. It matches
	// graph.ErrNotSupported.
	ErrKDFLimit error = &kindError{"key derivation cost exceeds the limit", graph.ErrNotSupported}
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
	// the JSON metadata. It matches graph.ErrNoSpace.
	ErrNoSpace error = &kindError{"no space left in the luks header", graph.ErrNoSpace}
	// ErrConcurrentUpdate means the LUKS2 header on disk changed since it was
	// opened; reopen it and retry.
	ErrConcurrentUpdate = errors.New("luks2 header was updated concurrently")
	// ErrInvalidArgument reports a bad option or parameter.
	ErrInvalidArgument = errors.New("invalid argument")
)
