package graph

import (
	"context"
	"fmt"
	"io"
)

// SectionIO is an io.ReaderAt and io.WriterAt over a section of a child:
// what format code that reads and writes through the io interfaces
// (drivers/luks/luksfmt, drivers/qcow2/qcow2fmt) is given in place of a
// *Child. Offsets passed to ReadAt and WriteAt are relative to the start of
// the section; every request carries the context the SectionIO was made
// with.
//
// Reads follow io.SectionReader: ReadAt reads the bytes that lie both in
// the section and in the child as it is at the call. When the request goes
// past the end of either, it reads the bytes before that end and returns
// their count with io.EOF (0 and io.EOF when off is negative or at or past
// that end). A request that fits returns len(p) and nil, also when it ends
// exactly at the end. An error from the child is returned as it is, with a
// count of 0.
//
// Writes stay within the section: a write that would go past its end (or
// starts at a negative offset) writes nothing and fails with ErrRange. A
// write within the section that goes past the end of the child grows the
// child to the write's end first (Truncate with PreallocOff), as metadata
// written into an empty or short image needs.
//
// A section made with n < 0 has no end of its own: it ends where the child
// ends at each call, and writes past that end grow it.
type SectionIO struct {
	ctx   context.Context
	c     *Child
	off   int64 // start of the section in the child
	n     int64 // length of the section, < 0 for up to the child's end
	flags ReqFlags
}

// NewSectionIO returns a SectionIO over [off, off+n) of c (over c from off
// to its end when n < 0). Its requests use ctx.
func NewSectionIO(ctx context.Context, c *Child, off, n int64) *SectionIO {
	return &SectionIO{ctx: ctx, c: c, off: off, n: n}
}

// WithFlags returns a copy whose writes carry f (FUA for metadata that must
// be stable when WriteAt returns).
func (s *SectionIO) WithFlags(f ReqFlags) *SectionIO {
	x := *s
	x.flags = f
	return &x
}

// Size returns the section's length: n, or for a section without an end
// what the child now holds past its start.
func (s *SectionIO) Size() int64 {
	if s.n >= 0 {
		return s.n
	}
	return max(s.c.Size()-s.off, 0)
}

// end is the child offset where reads stop: the end of the section or of
// the child, whichever comes first.
func (s *SectionIO) end() int64 {
	end := s.c.Size()
	if s.n >= 0 {
		end = min(end, s.off+s.n)
	}
	return end
}

// ReadAt implements io.ReaderAt.
func (s *SectionIO) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, io.EOF
	}
	off += s.off
	end := s.end()
	if off >= end {
		return 0, io.EOF
	}
	if avail := end - off; int64(len(p)) > avail {
		if err := s.c.ReadAt(s.ctx, p[:avail], off); err != nil {
			return 0, err
		}
		return int(avail), io.EOF
	}
	if err := s.c.ReadAt(s.ctx, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt implements io.WriterAt.
func (s *SectionIO) WriteAt(p []byte, off int64) (int, error) {
	n := int64(len(p))
	if off < 0 || s.n >= 0 && off > s.n-n {
		return 0, fmt.Errorf("write of %d bytes at %d is outside the section: %w", n, off, ErrRange)
	}
	off += s.off
	if end := off + n; end > s.c.Size() {
		if err := s.c.Truncate(s.ctx, end, PreallocOff); err != nil {
			return 0, err
		}
	}
	if err := s.c.WriteAt(s.ctx, p, off, s.flags); err != nil {
		return 0, err
	}
	return len(p), nil
}
