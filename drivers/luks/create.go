package luks

import (
	"context"
	"errors"

	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/luks/qcrypto"
	"blockd/graph"
)

type preallocMode string

func (preallocMode) EnumValues() []string { return []string{"off", "metadata", "falloc", "full"} }

// CreateOptions is BlockdevCreateOptionsLUKS (QEMU 9.0: file optional,
// header).
type CreateOptions struct {
	File   *graph.Ref `json:"file,omitempty"`
	Header *graph.Ref `json:"header,omitempty"`
	qcrypto.CreateFields
	Size          uint64        `json:"size"`
	Preallocation *preallocMode `json:"preallocation,omitempty"`
}

func create(ctx context.Context, cc *graph.CreateContext, v any) error {
	opts := v.(*CreateOptions)
	if opts.File == nil && opts.Header == nil {
		return errors.New("Either the parameter 'header' or 'file' must be specified")
	}
	prealloc := graph.PreallocOff
	if opts.Preallocation != nil {
		prealloc = graph.Prealloc(*opts.Preallocation)
	}
	if prealloc != graph.PreallocOff && opts.File == nil {
		return errors.New("Parameter 'preallocation' requires 'file'")
	}
	if prealloc == graph.PreallocMetadata {
		prealloc = graph.PreallocOff
	}
	if opts.KeySecret == nil {
		return errors.New("Parameter 'key-secret' is required for cipher")
	}
	fo, err := opts.FormatOptions()
	if err != nil {
		return err
	}
	file, err := cc.Open(opts.File, "file")
	if err != nil {
		return err
	}
	header, err := cc.Open(opts.Header, "header")
	if err != nil {
		return err
	}
	pass, err := cc.Secret(*opts.KeySecret)
	if err != nil {
		return err
	}
	defer luksfmt.Wipe(pass)
	fo.Passphrase = pass
	fo.Detached = header != nil
	meta := file
	if header != nil {
		meta = header
	}
	hdr, key, err := luksfmt.Create(graph.NewSectionIO(ctx, meta, 0, -1), fo)
	if err != nil {
		return qcrypto.GraphError(err)
	}
	luksfmt.Wipe(key)
	// Like QEMU (truncate with exact=false), devices grow to what the
	// volume needs but are never shrunk.
	if header != nil {
		if err := grow(ctx, header, hdr.HeaderSize(), graph.PreallocOff); err != nil {
			return err
		}
		if err := header.Flush(ctx); err != nil {
			return err
		}
		if file != nil {
			if err := grow(ctx, file, int64(opts.Size), prealloc); err != nil {
				return err
			}
		}
	} else if err := grow(ctx, file, hdr.PayloadOffset()+int64(opts.Size), prealloc); err != nil {
		return err
	}
	if file != nil {
		return file.Flush(ctx)
	}
	return nil
}

func grow(ctx context.Context, c *graph.Child, size int64, prealloc graph.Prealloc) error {
	if c.Size() >= size {
		return nil
	}
	return c.Truncate(ctx, size, prealloc)
}
