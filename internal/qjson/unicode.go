package qjson

import (
	"fmt"
	"unicode/utf8"
)

func hexVal(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// cvt4hex reads four hex digits at s[i:]; -1 if they are not all there.
func cvt4hex(s []byte, i int) int {
	cp := 0
	for k := 0; k < 4; k++ {
		if i+k >= len(s) {
			return -1
		}
		h := hexVal(s[i+k])
		if h < 0 {
			return -1
		}
		cp = cp<<4 | h
	}
	return cp
}

// parseString is json-parser.c parse_string for a complete string token
// (quotes included). With mod, U+0000 becomes C0 80 (mod_utf8_encode);
// otherwise a NUL byte.
func parseString(tok []byte, mod bool) (string, error) {
	quote := tok[0]
	out := make([]byte, 0, len(tok)-2)
	i := 1
	for i < len(tok) && tok[i] != quote {
		if tok[i] == '\\' {
			beg := i
			i++
			c := tok[i]
			i++
			switch c {
			case '"', '\'', '\\', '/':
				out = append(out, c)
			case 'b':
				out = append(out, '\b')
			case 'f':
				out = append(out, '\f')
			case 'n':
				out = append(out, '\n')
			case 'r':
				out = append(out, '\r')
			case 't':
				out = append(out, '\t')
			case 'u':
				cp := cvt4hex(tok, i)
				i += 4
				if cp >= 0xD800 && cp <= 0xDBFF && i+1 < len(tok) && tok[i] == '\\' && tok[i+1] == 'u' {
					cp = 0x10000 + (cp&0x3FF)<<10
					if tr := cvt4hex(tok, i+2); tr >= 0xDC00 && tr <= 0xDFFF {
						cp |= tr & 0x3FF
						i += 6
					} else {
						cp = -1
					}
				}
				if !validCodepoint(cp) {
					end := min(i, len(tok))
					return "", parseError(fmt.Sprintf("%s is not a valid Unicode character", tok[beg:end]))
				}
				out = appendCodepoint(out, cp, mod)
			default:
				return "", parseError("invalid escape sequence in string")
			}
			continue
		}
		cp, n := modUTF8(tok[i:])
		if cp < 0 {
			return "", parseError("invalid UTF-8 sequence in string")
		}
		i += n
		out = appendCodepoint(out, cp, mod)
	}
	return string(out), nil
}

// appendCodepoint appends cp in UTF-8; U+0000 as C0 80 when mod is set.
func appendCodepoint(b []byte, cp int, mod bool) []byte {
	switch {
	case cp == 0 && mod:
		return append(b, 0xC0, 0x80)
	case cp < 0x80:
		return append(b, byte(cp))
	}
	return utf8.AppendRune(b, rune(cp))
}

// validCodepoint is util/unicode.c is_valid_codepoint.
func validCodepoint(cp int) bool {
	switch {
	case cp < 0 || cp > 0x10FFFF:
		return false
	case cp >= 0xFDD0 && cp <= 0xFDEF, cp&0xFFFE == 0xFFFE:
		return false // noncharacter
	case cp >= 0xD800 && cp <= 0xDFFF:
		return false // surrogate
	}
	return true
}

// modUTF8 is util/unicode.c mod_utf8_codepoint: the code point at the start
// of s (modified UTF-8, so "\xC0\x80" is U+0000) and the bytes it spans; -1
// for an invalid sequence. s must not be empty.
func modUTF8(s []byte) (cp, n int) {
	b := s[0]
	switch {
	case b < 0x80:
		if b == 0 {
			return -1, 0
		}
		return int(b), 1
	case b >= 0xFE, b&0x40 == 0:
		return -1, 1
	}
	length := 0
	mask := byte(0x80)
	for ; b&mask != 0; mask >>= 1 {
		length++
	}
	cp = int(b & (mask - 1))
	n = 1
	for k := 1; k < length; k++ {
		var c byte
		if k < len(s) {
			c = s[k]
		}
		if c&0xC0 != 0x80 {
			return -1, n
		}
		n++
		cp = cp<<6 | int(c&0x3F)
	}
	minCP := [...]int{0x80, 0x800, 0x10000, 0x200000, 0x4000000}
	if !validCodepoint(cp) || (cp < minCP[length-2] && !(cp == 0 && length == 2)) {
		return -1, n
	}
	return cp, n
}

// Printable is the text QEMU's JSON writer (json-writer.c quoted_str)
// prints for the bytes of s, such as an error text in a QMP reply: s is
// read as modified UTF-8 up to its first NUL byte, each invalid sequence
// becomes U+FFFD and C0 80 a NUL byte (which the writer prints as
// \u0000).
func Printable(s string) string {
	valid := true
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 0x80 || c == 0 {
			valid = false
			break
		}
	}
	if valid {
		return s
	}
	b := []byte(s)
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); {
		cp, n := modUTF8(b[i:])
		if n == 0 {
			break // NUL ends a C string
		}
		if cp < 0 {
			cp = 0xFFFD
		}
		out = appendCodepoint(out, cp, false)
		i += n
	}
	return string(out)
}
