package keyval

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// This file parses JSON option arguments the way QEMU 7.2's
// qobject_from_json does (qobject/json-lexer.c, json-streamer.c,
// json-parser.c), so that results and error texts match:
//
//   - strings may be single-quoted, and "\'" is an escape in both kinds;
//   - strings are held in modified UTF-8: "\u0000" becomes C0 80, and
//     noncharacters such as U+FFFE are rejected;
//   - a lexical error anywhere before the value is complete wins over a
//     grammar error ("JSON parse error, stray '...'");
//   - duplicate keys are an error, reported after the duplicate's value
//     has been parsed;
//   - anything after the first value is "Expecting at most one JSON value".
//
// Numbers are returned as json.Number holding the token's text; objects as
// map[string]any, arrays as []any, true/false as bool and null as nil.

// QEMU's limits (qobject/json-streamer.c).
const (
	maxTokenSize  = 64 << 20
	maxTokenCount = 2 << 20
	maxNesting    = 1 << 10
)

// Lexer states and token kinds share one number space, as in QEMU: a
// transition yields either the next state or a completed token.
const (
	jsonError = iota // a lexical error
	inRecovery
	inDQStringEscape
	inDQString
	inSQStringEscape
	inSQString
	inZero
	inExpDigits
	inExpSign
	inExpE
	inMantissa
	inMantissaDigits
	inDigits
	inSign
	inKeyword
	inStart

	jsonLCurly
	jsonRCurly
	jsonLSquare
	jsonRSquare
	jsonColon
	jsonComma
	jsonInteger
	jsonFloat
	jsonKeyword
	jsonString
	jsonEndOfInput
)

// transition is QEMU's json_lexer table. lookahead means c is not part of
// the completed token and must be fed again.
func transition(state int, c byte) (next int, lookahead bool) {
	digit := c >= '0' && c <= '9'
	switch state {
	case inRecovery:
		switch {
		case c == '\t':
			return inRecovery, false
		case c < 0x20, c >= 0xFE, strings.IndexByte("[]{}:,", c) >= 0:
			return inStart, true
		}
		return inRecovery, false
	case inDQStringEscape, inSQStringEscape:
		if c >= 0x20 && c <= 0xFD {
			return state + 1, false // the matching string state
		}
	case inDQString, inSQString:
		quote := byte('"')
		if state == inSQString {
			quote = '\''
		}
		switch {
		case c == '\\':
			return state - 1, false // the matching escape state
		case c == quote:
			return jsonString, false
		case c >= 0x20 && c <= 0xFD:
			return state, false
		}
	case inZero:
		switch {
		case digit:
			return jsonError, false
		case c == '.':
			return inMantissa, false
		}
		return jsonInteger, true
	case inExpDigits:
		if digit {
			return inExpDigits, false
		}
		return jsonFloat, true
	case inExpSign:
		if digit {
			return inExpDigits, false
		}
	case inExpE:
		switch {
		case c == '-' || c == '+':
			return inExpSign, false
		case digit:
			return inExpDigits, false
		}
	case inMantissaDigits:
		switch {
		case digit:
			return inMantissaDigits, false
		case c == 'e' || c == 'E':
			return inExpE, false
		}
		return jsonFloat, true
	case inMantissa:
		if digit {
			return inMantissaDigits, false
		}
	case inDigits:
		switch {
		case digit:
			return inDigits, false
		case c == 'e' || c == 'E':
			return inExpE, false
		case c == '.':
			return inMantissa, false
		}
		return jsonInteger, true
	case inSign:
		switch {
		case c == '0':
			return inZero, false
		case digit:
			return inDigits, false
		}
	case inKeyword:
		if c >= 'a' && c <= 'z' {
			return inKeyword, false
		}
		return jsonKeyword, true
	case inStart:
		switch {
		case c == '"':
			return inDQString, false
		case c == '\'':
			return inSQString, false
		case c == '0':
			return inZero, false
		case digit:
			return inDigits, false
		case c == '-':
			return inSign, false
		case c == '{':
			return jsonLCurly, false
		case c == '}':
			return jsonRCurly, false
		case c == '[':
			return jsonLSquare, false
		case c == ']':
			return jsonRSquare, false
		case c == ',':
			return jsonComma, false
		case c == ':':
			return jsonColon, false
		case c >= 'a' && c <= 'z':
			return inKeyword, false
		case c == ' ' || c == '\t' || c == '\r' || c == '\n':
			return inStart, false
		}
	}
	return jsonError, false
}

type jsonToken struct {
	kind int
	text string
}

// jsonReader runs QEMU's lexer and streamer over one input and collects
// the result the way qobject_from_json's consume_json does.
type jsonReader struct {
	state int
	tok   []byte // the token being lexed

	// Streamer state.
	brace, bracket int
	tokens         []jsonToken
	tokenSize      int

	// Result.
	result    any
	hasResult bool
	err       error
}

func (r *jsonReader) feed(c byte, flush bool) {
	consumed := false
	for {
		if flush {
			if r.state == inStart {
				break
			}
		} else if consumed {
			break
		}
		next, lookahead := transition(r.state, c)
		consumed = !flush && !lookahead
		if consumed {
			r.tok = append(r.tok, c)
		}
		switch {
		case next >= jsonLCurly:
			r.process(next, string(r.tok))
			r.tok = r.tok[:0]
			next = inStart
		case next == inStart:
			r.tok = r.tok[:0]
		case next == jsonError:
			r.process(jsonError, string(r.tok))
			r.tok = r.tok[:0]
			next = inRecovery
		case next == inRecovery:
			r.tok = r.tok[:0]
		}
		r.state = next
	}
}

// process is QEMU's json_message_process_token.
func (r *jsonReader) process(kind int, text string) {
	switch kind {
	case jsonLCurly:
		r.brace++
	case jsonRCurly:
		r.brace--
	case jsonLSquare:
		r.bracket++
	case jsonRSquare:
		r.bracket--
	case jsonError:
		r.emit(nil, fmt.Errorf("JSON parse error, stray '%s'", text))
		return
	case jsonEndOfInput:
		if len(r.tokens) == 0 {
			return
		}
		r.emit(parseTokens(r.tokens))
		return
	}
	switch {
	case r.tokenSize+len(text)+1 > maxTokenSize:
		r.emit(nil, errors.New("JSON token size limit exceeded"))
		return
	case len(r.tokens)+1 > maxTokenCount:
		r.emit(nil, errors.New("JSON token count limit exceeded"))
		return
	case r.bracket+r.brace > maxNesting:
		r.emit(nil, errors.New("JSON nesting depth limit exceeded"))
		return
	}
	r.tokens = append(r.tokens, jsonToken{kind: kind, text: text})
	r.tokenSize += len(text)
	if (r.brace > 0 || r.bracket > 0) && r.brace >= 0 && r.bracket >= 0 {
		return
	}
	r.emit(parseTokens(r.tokens))
}

// emit resets the streamer and records a value or error as consume_json
// does: the first error sticks, and a second value is an error.
func (r *jsonReader) emit(v any, err error) {
	r.brace, r.bracket = 0, 0
	r.tokens = r.tokens[:0]
	r.tokenSize = 0
	if r.hasResult {
		r.result, r.hasResult = nil, false
		r.err = errors.New("Expecting at most one JSON value")
	}
	if r.err != nil {
		return
	}
	if err != nil {
		r.err = err
		return
	}
	r.result, r.hasResult = v, true
}

// parseJSON parses s, which starts with '{', as one JSON object.
func parseJSON(s string) (map[string]any, error) {
	// QEMU sees a C string.
	if i := strings.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	r := &jsonReader{state: inStart}
	for i := 0; i < len(s); i++ {
		r.feed(s[i], false)
	}
	r.feed(0, true)
	r.process(jsonEndOfInput, "")
	if r.err != nil {
		return nil, r.err
	}
	if !r.hasResult {
		return nil, errors.New("Expecting a JSON value")
	}
	m, ok := r.result.(map[string]any)
	if !ok {
		// Unreachable while callers check for a leading '{'.
		return nil, errors.New("JSON value is not an object")
	}
	return m, nil
}

// jsonParser is QEMU's json_parser_parse over one balanced token group.
// The first error ends parsing, as QEMU keeps only the first.
type jsonParser struct {
	tokens []jsonToken
	pos    int
}

func parseTokens(tokens []jsonToken) (any, error) {
	p := &jsonParser{tokens: tokens}
	return p.value()
}

func parseError(format string, a ...any) error {
	return errors.New("JSON parse error, " + fmt.Sprintf(format, a...))
}

var errPrematureEOI = errors.New("JSON parse error, premature EOI")

func (p *jsonParser) peek() *jsonToken {
	if p.pos >= len(p.tokens) {
		return nil
	}
	return &p.tokens[p.pos]
}

func (p *jsonParser) pop() *jsonToken {
	t := p.peek()
	if t != nil {
		p.pos++
	}
	return t
}

func (p *jsonParser) value() (any, error) {
	t := p.peek()
	if t == nil {
		return nil, errPrematureEOI
	}
	switch t.kind {
	case jsonLCurly:
		return p.object()
	case jsonLSquare:
		return p.array()
	case jsonInteger, jsonFloat:
		p.pop()
		return json.Number(t.text), nil
	case jsonString:
		p.pop()
		return parseString(t.text)
	case jsonKeyword:
		p.pop()
		switch t.text {
		case "true":
			return true, nil
		case "false":
			return false, nil
		case "null":
			return nil, nil
		}
		return nil, parseError("invalid keyword '%s'", t.text)
	}
	return nil, parseError("expecting value")
}

func (p *jsonParser) object() (any, error) {
	p.pop() // '{'
	m := make(map[string]any)
	t := p.peek()
	if t == nil {
		return nil, errPrematureEOI
	}
	if t.kind == jsonRCurly {
		p.pop()
		return m, nil
	}
	if err := p.pair(m); err != nil {
		return nil, err
	}
	for {
		t := p.pop()
		if t == nil {
			return nil, errPrematureEOI
		}
		if t.kind == jsonRCurly {
			return m, nil
		}
		if t.kind != jsonComma {
			return nil, parseError("expected separator in dict")
		}
		if err := p.pair(m); err != nil {
			return nil, err
		}
	}
}

func (p *jsonParser) pair(m map[string]any) error {
	if p.peek() == nil {
		return errPrematureEOI
	}
	k, err := p.value()
	if err != nil {
		return err
	}
	key, ok := k.(string)
	if !ok {
		return parseError("key is not a string in object")
	}
	t := p.pop()
	if t == nil {
		return errPrematureEOI
	}
	if t.kind != jsonColon {
		return parseError("missing : in object pair")
	}
	v, err := p.value()
	if err != nil {
		return err
	}
	if _, dup := m[key]; dup {
		return parseError("duplicate key")
	}
	m[key] = v
	return nil
}

func (p *jsonParser) array() (any, error) {
	p.pop() // '['
	list := []any{}
	t := p.peek()
	if t == nil {
		return nil, errPrematureEOI
	}
	if t.kind == jsonRSquare {
		p.pop()
		return list, nil
	}
	for {
		v, err := p.value()
		if err != nil {
			return nil, err
		}
		list = append(list, v)
		t := p.pop()
		if t == nil {
			return nil, errPrematureEOI
		}
		if t.kind == jsonRSquare {
			return list, nil
		}
		if t.kind != jsonComma {
			return nil, parseError("expected separator in list")
		}
	}
}

// at returns s[i], or 0 past the end, like reading a C string.
func at(s string, i int) byte {
	if i < len(s) {
		return s[i]
	}
	return 0
}

// cvt4hex converts the four hex digits at s[i:], or returns -1.
func cvt4hex(s string, i int) int {
	cp := 0
	for k := 0; k < 4; k++ {
		c := at(s, i+k)
		switch {
		case c >= '0' && c <= '9':
			cp = cp<<4 | int(c-'0')
		case c >= 'a' && c <= 'f':
			cp = cp<<4 | int(c-'a'+10)
		case c >= 'A' && c <= 'F':
			cp = cp<<4 | int(c-'A'+10)
		default:
			return -1
		}
	}
	return cp
}

// parseString decodes a string token, quotes included, into modified
// UTF-8 (QEMU's parse_string).
func parseString(s string) (string, error) {
	quote := s[0]
	var b []byte
	i := 1
	for i < len(s) && s[i] != quote {
		if s[i] != '\\' {
			cp, end := modUTF8Codepoint(s, i, 6)
			if cp < 0 {
				return "", parseError("invalid UTF-8 sequence in string")
			}
			b = appendModUTF8(b, cp)
			i = end
			continue
		}
		beg := i
		i++
		c := at(s, i)
		i++
		switch c {
		case '"', '\'', '\\', '/':
			b = append(b, c)
		case 'b':
			b = append(b, '\b')
		case 'f':
			b = append(b, '\f')
		case 'n':
			b = append(b, '\n')
		case 'r':
			b = append(b, '\r')
		case 't':
			b = append(b, '\t')
		case 'u':
			cp := cvt4hex(s, i)
			i += 4
			if cp >= 0xD800 && cp <= 0xDBFF && at(s, i) == '\\' && at(s, i+1) == 'u' {
				cp = 0x10000 + (cp&0x3FF)<<10
				trailing := cvt4hex(s, i+2)
				if trailing >= 0xDC00 && trailing <= 0xDFFF {
					cp |= trailing & 0x3FF
					i += 6
				} else {
					cp = -1
				}
			}
			if !validCodepoint(cp) {
				return "", parseError("%s is not a valid Unicode character", s[beg:min(i, len(s))])
			}
			b = appendModUTF8(b, cp)
		default:
			return "", parseError("invalid escape sequence in string")
		}
	}
	return string(b), nil
}

// validCodepoint is QEMU's is_valid_codepoint: no surrogates, no
// noncharacters, nothing beyond U+10FFFF.
func validCodepoint(cp int) bool {
	switch {
	case cp < 0 || cp > 0x10FFFF:
		return false
	case cp >= 0xFDD0 && cp <= 0xFDEF, cp&0xFFFE == 0xFFFE:
		return false
	case cp >= 0xD800 && cp <= 0xDFFF:
		return false
	}
	return true
}

// modUTF8Codepoint is QEMU's mod_utf8_codepoint: it decodes the sequence
// at s[i:], looking at most n bytes, and returns the code point (-1 if
// invalid) and the index after the bytes it consumed. C0 80 is U+0000.
func modUTF8Codepoint(s string, i, n int) (int, int) {
	minCP := [...]int{0x80, 0x800, 0x10000, 0x200000, 0x4000000}
	c := int(at(s, i))
	p := i + 1
	switch {
	case c < 0x80:
		return c, p
	case c >= 0xFE:
		return -1, p
	case c&0x40 == 0:
		return -1, p // unexpected continuation byte
	}
	length := 0
	mask := 0x80
	for ; c&mask != 0; mask >>= 1 {
		length++
	}
	cp := c & (mask - 1)
	for k := 1; k < length; k++ {
		b := 0
		if k < n {
			b = int(at(s, p))
		}
		if b&0xC0 != 0x80 {
			return -1, p
		}
		p++
		cp = cp<<6 | b&0x3F
	}
	if !validCodepoint(cp) || (cp < minCP[length-2] && !(cp == 0 && length == 2)) {
		return -1, p
	}
	return cp, p
}

// appendModUTF8 appends cp in modified UTF-8 (QEMU's mod_utf8_encode).
func appendModUTF8(b []byte, cp int) []byte {
	switch {
	case cp > 0 && cp <= 0x7F:
		return append(b, byte(cp))
	case cp <= 0x7FF:
		return append(b, byte(0xC0|cp>>6&0x1F), byte(0x80|cp&0x3F))
	case cp <= 0xFFFF:
		return append(b, byte(0xE0|cp>>12&0x0F), byte(0x80|cp>>6&0x3F), byte(0x80|cp&0x3F))
	}
	return append(b, byte(0xF0|cp>>18&0x07), byte(0x80|cp>>12&0x3F), byte(0x80|cp>>6&0x3F), byte(0x80|cp&0x3F))
}
