package secrets

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"unicode/utf8"
)

// base64Valid holds the characters QEMU's qbase64_decode accepts.
const base64Valid = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n"

// qbase64Decode is QEMU's qbase64_decode: the input may hold only base64
// characters, '=' and newlines (checkNUL adds QEMU's check for NUL bytes,
// made when the length is known), and is then decoded as glib's
// g_base64_decode does, which is lenient about padding and grouping.
func qbase64Decode(in []byte, checkNUL bool) ([]byte, error) {
	if checkNUL && bytes.IndexByte(in, 0) >= 0 {
		return nil, errors.New("Base64 data contains embedded NUL characters")
	}
	for _, c := range in {
		if strings.IndexByte(base64Valid, c) < 0 {
			return nil, errors.New("Base64 data contains invalid characters")
		}
	}
	return gBase64Decode(in), nil
}

// gBase64Decode decodes like glib's g_base64_decode: characters outside
// the alphabet are skipped, each complete group of four yields three bytes
// less one for each trailing '=', and an incomplete final group is dropped.
func gBase64Decode(in []byte) []byte {
	out := make([]byte, 0, len(in)/4*3+3)
	var v uint32
	n := 0
	var last0, last1 byte
	for _, c := range in {
		rank, ok := base64Rank(c)
		if !ok {
			continue
		}
		last1, last0 = last0, c
		v = v<<6 | uint32(rank)
		n++
		if n == 4 {
			out = append(out, byte(v>>16))
			if last1 != '=' {
				out = append(out, byte(v>>8))
			}
			if last0 != '=' {
				out = append(out, byte(v))
			}
			n = 0
		}
	}
	return out
}

// base64Rank is glib's mime_base64_rank: the 6-bit value of c, with '='
// counting as 0.
func base64Rank(c byte) (byte, bool) {
	switch {
	case c >= 'A' && c <= 'Z':
		return c - 'A', true
	case c >= 'a' && c <= 'z':
		return c - 'a' + 26, true
	case c >= '0' && c <= '9':
		return c - '0' + 52, true
	case c == '+':
		return 62, true
	case c == '/':
		return 63, true
	case c == '=':
		return 0, true
	}
	return 0, false
}

// MaxFileSize is the largest secret file accepted, in bytes. QEMU reads a
// secret file whole whatever its size, so "file=/dev/zero" fills memory
// until the kernel kills the daemon; a passphrase or key is far smaller.
const MaxFileSize = 64 << 10

// secretFileType reports whether a file of mode m may be read as a secret:
// a regular file, or a FIFO (a passphrase piped in, such as /dev/stdin).
// A directory is let through too: reading it fails at once with QEMU's
// text ("Error reading file “/d”: Is a directory").
func secretFileType(m os.FileMode) bool {
	return m.IsRegular() || m&os.ModeNamedPipe != 0 || m.IsDir()
}

// readFile reads a whole file as glib's g_file_get_contents does, with its
// error texts ("Failed to open file “/p”: No such file or directory"), but
// bounded: a file of a type secretFileType refuses, or longer than
// MaxFileSize, is an error, and no more than MaxFileSize+1 bytes are read.
// Opening a FIFO waits for a writer, as in QEMU.
func readFile(path string) ([]byte, error) {
	name := displayName(path)
	notAllowed := fmt.Errorf("secret file “%s” is not a regular file or FIFO", name)
	tooLarge := fmt.Errorf("secret file “%s” is larger than %d bytes", name, MaxFileSize)
	// Devices and sockets are refused before they are opened: opening a
	// device can have effects of its own. When the path cannot be looked
	// at, the open below reports why in glib's words.
	if fi, err := os.Stat(path); err == nil && !secretFileType(fi.Mode()) {
		return nil, notAllowed
	}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("Failed to open file “%s”: %s", name, strerror(err))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("Failed to get attributes of file “%s”: fstat() failed: %s", name, strerror(err))
	}
	// Checked again on what was opened: the path may have been replaced.
	regular := fi.Mode().IsRegular()
	switch {
	case !secretFileType(fi.Mode()):
		return nil, notAllowed
	case regular && fi.Size() > MaxFileSize:
		return nil, tooLarge
	}
	// A buffer that is outgrown is wiped before it is dropped; one byte
	// past MaxFileSize tells a file of exactly MaxFileSize from a longer one.
	buf := make([]byte, 0, 512)
	if regular {
		buf = make([]byte, 0, fi.Size()+1)
	}
	for len(buf) <= MaxFileSize {
		if len(buf) == cap(buf) {
			nb := make([]byte, len(buf), min(2*cap(buf), MaxFileSize+1))
			copy(nb, buf)
			clear(buf)
			buf = nb
		}
		n, err := f.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			clear(buf)
			if regular && fi.Size() > 0 {
				return nil, fmt.Errorf("Failed to read from file “%s”: %s", name, strerror(err))
			}
			return nil, fmt.Errorf("Error reading file “%s”: %s", name, strerror(err))
		}
	}
	clear(buf)
	return nil, tooLarge
}

// strerror returns the C library's text for the errno in err: Go's texts
// are glibc's with a lower-case first letter.
func strerror(err error) string {
	var errno syscall.Errno
	msg := err.Error()
	if errors.As(err, &errno) {
		msg = errno.Error()
	} else if errors.Is(err, io.ErrUnexpectedEOF) {
		msg = "input/output error"
	}
	if msg == "" {
		return msg
	}
	return strings.ToUpper(msg[:1]) + msg[1:]
}

// displayName is glib's g_filename_display_name for UTF-8 file names:
// each byte that is not part of valid UTF-8 becomes U+FFFD.
func displayName(path string) string {
	if utf8.ValidString(path) {
		return path
	}
	var b strings.Builder
	for i := 0; i < len(path); {
		r, size := utf8.DecodeRuneInString(path[i:])
		if r == utf8.RuneError && size == 1 {
			b.WriteRune(utf8.RuneError)
		} else {
			b.WriteString(path[i : i+size])
		}
		i += size
	}
	return b.String()
}
