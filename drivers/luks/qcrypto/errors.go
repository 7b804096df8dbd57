package qcrypto

import (
	"errors"

	"blockd/drivers/luks/luksfmt"
	"blockd/graph"
)

// graphError is a luksfmt error that also matches the graph sentinel of its
// kind.
type graphError struct {
	err, kind error
}

func (e *graphError) Error() string   { return e.err.Error() }
func (e *graphError) Unwrap() []error { return []error{e.err, e.kind} }

// GraphError returns err so that errors.Is also matches the graph sentinel
// of its luksfmt kind, for the edges (QMP, NBD) that classify errors with
// graph's sentinels: ErrNotLUKS and ErrCorrupt match graph.ErrCorrupt,
// ErrUnsupported and ErrKDFLimit graph.ErrNotSupported, ErrNoSpace
// graph.ErrNoSpace. Its message and what it matched before stay; other
// errors (nil among them) are returned as they are.
func GraphError(err error) error {
	var kind error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, luksfmt.ErrNotLUKS), errors.Is(err, luksfmt.ErrCorrupt):
		kind = graph.ErrCorrupt
	case errors.Is(err, luksfmt.ErrUnsupported), errors.Is(err, luksfmt.ErrKDFLimit):
		kind = graph.ErrNotSupported
	case errors.Is(err, luksfmt.ErrNoSpace):
		kind = graph.ErrNoSpace
	default:
		return err
	}
	if errors.Is(err, kind) {
		return err
	}
	return &graphError{err, kind}
}
