package qmp

import (
	"encoding/json"
	"fmt"
	"unicode/utf8"
)

// This file is a streaming JSON parser that behaves like QEMU's
// qobject/json-lexer.c, json-streamer.c and json-parser.c together: the same
// token rules (single-quoted strings, keywords lexed as [a-z]+), the same
// limits, the same recovery after a lexical error, and the same error texts.
//
// QEMU queues the tokens of a message and parses them once the braces and
// brackets balance. We parse incrementally instead and remember the first
// error; recursive descent stops at the first offending token, so the error
// is the same, and a message that has gone wrong costs no memory while the
// rest of it streams in.

// QEMU's limits (json-streamer.c, json-lexer.c).
const (
	MaxTokenSize  = 64 << 20 // bytes, one token and all tokens of a message
	MaxTokenCount = 2 << 20  // tokens in one message
	MaxNesting    = 1 << 10  // open braces plus brackets
)

// Limits bound a Parser's memory; the zero value means QEMU's limits.
type Limits struct {
	TokenSize  int
	TokenCount int
	Nesting    int
}

// lexer states (json-lexer.c enum json_lexer_state, minus interpolation).
type lexState uint8

const (
	inStart lexState = iota
	inRecovery
	inDQEscape
	inDQ
	inSQEscape
	inSQ
	inZero
	inExpDigits
	inExpSign
	inExpE
	inMantissa
	inMantissaDigits
	inDigits
	inSign
	inKeyword
)

type tokType uint8

const (
	tokNone tokType = iota // not a token: keep lexing
	tokLCurly
	tokRCurly
	tokLSquare
	tokRSquare
	tokColon
	tokComma
	tokInteger
	tokFloat
	tokKeyword
	tokString
	tokError
	tokOverflow // a token grew past the size limit
)

// Parser splits a byte stream into JSON values. Each complete value, or
// each error, is passed to the emit function given to NewParser, exactly
// when QEMU's monitor would act on it. Errors are *Error values of class
// GenericError with QEMU's texts ("JSON parse error, expecting value").
// A Parser is not safe for concurrent use.
type Parser struct {
	emit   func(v any, err error)
	limits Limits

	// lexer
	state lexState
	token []byte

	// streamer
	brace, bracket int
	tokenSize      int
	tokenCount     int

	// incremental parser
	err   error   // first parse error of the current message
	stack []frame // open containers
	done  bool    // a top-level value has been parsed
	value any
}

type frameState uint8

const (
	objOpen  frameState = iota // after '{'
	objKey                     // after ','
	objColon                   // after the key
	objValue                   // after ':'
	objSep                     // after a member
	arrOpen                    // after '['
	arrValue                   // after ','
	arrSep                     // after an element
)

type frame struct {
	state frameState
	obj   map[string]any
	arr   []any
	key   string
}

// NewParser returns a parser that calls emit for every message.
func NewParser(emit func(v any, err error)) *Parser {
	return NewParserLimits(emit, Limits{})
}

// NewParserLimits is NewParser with other limits (tests and fuzzing use
// small ones to bound memory).
func NewParserLimits(emit func(v any, err error), l Limits) *Parser {
	if l.TokenSize <= 0 {
		l.TokenSize = MaxTokenSize
	}
	if l.TokenCount <= 0 {
		l.TokenCount = MaxTokenCount
	}
	if l.Nesting <= 0 {
		l.Nesting = MaxNesting
	}
	return &Parser{emit: emit, limits: l}
}

// SetEmit replaces the function called for every message.
func (p *Parser) SetEmit(emit func(v any, err error)) { p.emit = emit }

// Feed lexes and parses b. It may call emit any number of times.
func (p *Parser) Feed(b []byte) {
	for i := 0; i < len(b); {
		// Fast paths for runs of bytes that only extend the current token
		// (or are skipped during recovery); the result is the same as
		// feeding them one at a time.
		if n := p.run(b[i:]); n > 0 {
			i += n
			continue
		}
		p.feedChar(b[i], false)
		i++
	}
}

// run consumes the longest prefix of b that cannot end or break the
// current token, and returns its length.
func (p *Parser) run(b []byte) int {
	var ok func(c byte) bool
	switch p.state {
	case inDQ:
		ok = func(c byte) bool { return c >= 0x20 && c <= 0xFD && c != '"' && c != '\\' }
	case inSQ:
		ok = func(c byte) bool { return c >= 0x20 && c <= 0xFD && c != '\'' && c != '\\' }
	case inKeyword:
		ok = func(c byte) bool { return c >= 'a' && c <= 'z' }
	case inRecovery:
		n := 0
		for n < len(b) {
			c := b[n]
			if c < 0x20 && c != '\t' || c >= 0xFE || c == '[' || c == ']' || c == '{' || c == '}' || c == ':' || c == ',' {
				break
			}
			n++
		}
		return n
	default:
		return 0
	}
	// Stop before the token outgrows the limit, so that feedChar sees
	// the byte that makes it overflow.
	room := p.limits.TokenSize - len(p.token)
	n := 0
	for n < len(b) && n < room && ok(b[n]) {
		n++
	}
	p.token = append(p.token, b[:n]...)
	return n
}

// Flush ends the input: a pending number or keyword is completed, an
// unterminated string is a stray token, and an incomplete value is
// reported as "JSON parse error, premature EOI". The monitor never flushes
// (a partial request is dropped at disconnect); ParseJSON does.
func (p *Parser) Flush() {
	p.feedChar(0, true)
	if p.tokenCount == 0 {
		return
	}
	err := p.err
	if err == nil {
		err = parseError("premature EOI")
	}
	p.finish(nil, err)
}

// ParseJSON parses s as exactly one JSON value, like QEMU's
// qobject_from_json (used for JSON command-line arguments).
func ParseJSON(s string) (any, error) {
	var (
		result any
		got    bool
		perr   error
	)
	p := NewParser(func(v any, err error) {
		if got || perr != nil {
			if perr == nil {
				perr = &Error{Class: GenericError, Desc: "Expecting at most one JSON value"}
			}
			result = nil
			return
		}
		if err != nil {
			perr = err
			return
		}
		result, got = v, true
	})
	p.Feed([]byte(s))
	p.Flush()
	if perr != nil {
		return nil, perr
	}
	if !got {
		return nil, &Error{Class: GenericError, Desc: "Expecting a JSON value"}
	}
	return result, nil
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// next is one cell of QEMU's json_lexer table: the new state or token, and
// whether c is only looked at (not consumed). A zero token with ok=false
// means JSON_ERROR, which consumes c.
func next(s lexState, c byte) (ns lexState, tok tokType, lookahead bool) {
	switch s {
	case inRecovery:
		switch {
		case c == '\t':
			return inRecovery, tokNone, false
		case c < 0x20, c >= 0xFE, c == '[', c == ']', c == '{', c == '}', c == ':', c == ',':
			return inStart, tokNone, true
		default:
			return inRecovery, tokNone, false
		}
	case inDQEscape, inSQEscape:
		if c >= 0x20 && c <= 0xFD {
			if s == inDQEscape {
				return inDQ, tokNone, false
			}
			return inSQ, tokNone, false
		}
	case inDQ, inSQ:
		quote, esc := byte('"'), inDQEscape
		if s == inSQ {
			quote, esc = '\'', inSQEscape
		}
		switch {
		case c == quote:
			return inStart, tokString, false
		case c == '\\':
			return esc, tokNone, false
		case c >= 0x20 && c <= 0xFD:
			return s, tokNone, false
		}
	case inZero:
		switch {
		case isDigit(c):
			// JSON_ERROR
		case c == '.':
			return inMantissa, tokNone, false
		default:
			return inStart, tokInteger, true
		}
	case inExpDigits:
		if isDigit(c) {
			return inExpDigits, tokNone, false
		}
		return inStart, tokFloat, true
	case inExpSign:
		if isDigit(c) {
			return inExpDigits, tokNone, false
		}
	case inExpE:
		switch {
		case c == '-', c == '+':
			return inExpSign, tokNone, false
		case isDigit(c):
			return inExpDigits, tokNone, false
		}
	case inMantissaDigits:
		switch {
		case isDigit(c):
			return inMantissaDigits, tokNone, false
		case c == 'e', c == 'E':
			return inExpE, tokNone, false
		default:
			return inStart, tokFloat, true
		}
	case inMantissa:
		if isDigit(c) {
			return inMantissaDigits, tokNone, false
		}
	case inDigits:
		switch {
		case isDigit(c):
			return inDigits, tokNone, false
		case c == 'e', c == 'E':
			return inExpE, tokNone, false
		case c == '.':
			return inMantissa, tokNone, false
		default:
			return inStart, tokInteger, true
		}
	case inSign:
		switch {
		case c == '0':
			return inZero, tokNone, false
		case c >= '1' && c <= '9':
			return inDigits, tokNone, false
		}
	case inKeyword:
		if c >= 'a' && c <= 'z' {
			return inKeyword, tokNone, false
		}
		return inStart, tokKeyword, true
	case inStart:
		switch {
		case c == '"':
			return inDQ, tokNone, false
		case c == '\'':
			return inSQ, tokNone, false
		case c == '0':
			return inZero, tokNone, false
		case c >= '1' && c <= '9':
			return inDigits, tokNone, false
		case c == '-':
			return inSign, tokNone, false
		case c == '{':
			return inStart, tokLCurly, false
		case c == '}':
			return inStart, tokRCurly, false
		case c == '[':
			return inStart, tokLSquare, false
		case c == ']':
			return inStart, tokRSquare, false
		case c == ',':
			return inStart, tokComma, false
		case c == ':':
			return inStart, tokColon, false
		case c >= 'a' && c <= 'z':
			return inKeyword, tokNone, false
		case c == ' ', c == '\t', c == '\r', c == '\n':
			return inStart, tokNone, false
		}
	}
	return inRecovery, tokError, false
}

// feedChar is json_lexer_feed_char.
func (p *Parser) feedChar(c byte, flush bool) {
	consumed := false
	for {
		if flush {
			if p.state == inStart {
				break
			}
		} else if consumed {
			break
		}
		ns, tok, la := next(p.state, c)
		if flush {
			la = true
		}
		if !la {
			consumed = true
			p.token = append(p.token, c)
		}
		switch {
		case tok == tokError:
			p.processToken(tokError, p.token)
			p.token = p.token[:0]
			ns = inRecovery
		case tok != tokNone:
			p.processToken(tok, p.token)
			p.token = p.token[:0]
			ns = inStart
		case ns == inStart || ns == inRecovery:
			p.token = p.token[:0]
		}
		p.state = ns
	}
	// Do not let a single token grow without bound.
	if len(p.token) > p.limits.TokenSize {
		p.processToken(tokOverflow, p.token)
		p.token = p.token[:0]
		p.state = inStart
	}
	if cap(p.token) > 4096 && len(p.token) == 0 {
		p.token = nil // give back the memory of a huge token
	}
}

// processToken is json_message_process_token.
func (p *Parser) processToken(t tokType, text []byte) {
	switch t {
	case tokLCurly:
		p.brace++
	case tokRCurly:
		p.brace--
	case tokLSquare:
		p.bracket++
	case tokRSquare:
		p.bracket--
	case tokError:
		p.finish(nil, &Error{Class: GenericError, Desc: "JSON parse error, stray '" + cString(text) + "'"})
		return
	}
	switch {
	case p.tokenSize+len(text)+1 > p.limits.TokenSize:
		p.finish(nil, &Error{Class: GenericError, Desc: "JSON token size limit exceeded"})
		return
	case p.tokenCount+1 > p.limits.TokenCount:
		p.finish(nil, &Error{Class: GenericError, Desc: "JSON token count limit exceeded"})
		return
	case p.bracket+p.brace > p.limits.Nesting:
		p.finish(nil, &Error{Class: GenericError, Desc: "JSON nesting depth limit exceeded"})
		return
	}
	p.tokenSize += len(text)
	p.tokenCount++
	if p.err == nil {
		p.parseToken(t, text)
	}
	if (p.brace > 0 || p.bracket > 0) && p.brace >= 0 && p.bracket >= 0 {
		return
	}
	if p.err != nil {
		p.finish(nil, p.err)
		return
	}
	if !p.done {
		// Cannot happen: a closing token that balances the counts either
		// completes the value or is an error.
		p.finish(nil, parseError("premature EOI"))
		return
	}
	p.finish(p.value, nil)
}

// finish resets the message state and emits v or err.
func (p *Parser) finish(v any, err error) {
	p.brace, p.bracket = 0, 0
	p.tokenSize, p.tokenCount = 0, 0
	p.err = nil
	clear(p.stack)
	p.stack = p.stack[:0]
	p.done, p.value = false, nil
	p.emit(v, err)
}

// cString is how C prints the token: up to its first NUL byte.
func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return sanitize(b[:i])
		}
	}
	return sanitize(b)
}

func parseError(msg string) error {
	// parse_error() formats into a 1024-byte buffer.
	if len(msg) > 1023 {
		msg = msg[:1023]
	}
	return &Error{Class: GenericError, Desc: "JSON parse error, " + msg}
}

func (p *Parser) fail(msg string) { p.err = parseError(msg) }

// parseToken advances the parser by one token (which is already counted).
func (p *Parser) parseToken(t tokType, text []byte) {
	if len(p.stack) == 0 {
		if p.done {
			p.fail("expecting value") // unreachable, see processToken
			return
		}
		p.startValue(t, text)
		return
	}
	f := &p.stack[len(p.stack)-1]
	switch f.state {
	case objOpen:
		if t == tokRCurly {
			p.pop()
			return
		}
		p.startValue(t, text) // the key
	case objKey, objValue, arrValue:
		p.startValue(t, text)
	case arrOpen:
		if t == tokRSquare {
			p.pop()
			return
		}
		p.startValue(t, text)
	case objColon:
		if t != tokColon {
			p.fail("missing : in object pair")
			return
		}
		f.state = objValue
	case objSep:
		switch t {
		case tokRCurly:
			p.pop()
		case tokComma:
			f.state = objKey
		default:
			p.fail("expected separator in dict")
		}
	case arrSep:
		switch t {
		case tokRSquare:
			p.pop()
		case tokComma:
			f.state = arrValue
		default:
			p.fail("expected separator in list")
		}
	}
}

// startValue is parse_value for the token t.
func (p *Parser) startValue(t tokType, text []byte) {
	switch t {
	case tokLCurly:
		p.stack = append(p.stack, frame{state: objOpen, obj: map[string]any{}})
	case tokLSquare:
		p.stack = append(p.stack, frame{state: arrOpen, arr: []any{}})
	case tokInteger, tokFloat:
		p.complete(json.Number(text))
	case tokString:
		s, err := parseString(text)
		if err != nil {
			p.err = err
			return
		}
		p.complete(s)
	case tokKeyword:
		switch string(text) {
		case "true":
			p.complete(true)
		case "false":
			p.complete(false)
		case "null":
			p.complete(nil)
		default:
			p.fail("invalid keyword '" + string(text) + "'")
		}
	default:
		p.fail("expecting value")
	}
}

func (p *Parser) pop() {
	f := p.stack[len(p.stack)-1]
	p.stack[len(p.stack)-1] = frame{}
	p.stack = p.stack[:len(p.stack)-1]
	if f.obj != nil {
		p.complete(f.obj)
	} else {
		p.complete(f.arr)
	}
}

// complete hands a finished value to its container.
func (p *Parser) complete(v any) {
	if len(p.stack) == 0 {
		p.done, p.value = true, v
		return
	}
	f := &p.stack[len(p.stack)-1]
	switch f.state {
	case objOpen, objKey:
		s, ok := v.(string)
		if !ok {
			p.fail("key is not a string in object")
			return
		}
		f.key, f.state = s, objColon
	case objValue:
		if _, dup := f.obj[f.key]; dup {
			p.fail("duplicate key")
			return
		}
		f.obj[f.key] = v
		f.key, f.state = "", objSep
	case arrOpen, arrValue:
		f.arr = append(f.arr, v)
		f.state = arrSep
	}
}

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
// (quotes included).
func parseString(tok []byte) (string, error) {
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
					return "", parseError(fmt.Sprintf("%s is not a valid Unicode character", sanitize(tok[beg:end])))
				}
				out = appendRune(out, cp)
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
		out = appendRune(out, cp)
	}
	return string(out), nil
}

func appendRune(b []byte, cp int) []byte {
	if cp < 0x80 {
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

// sanitize turns bytes into the text QEMU would print for them: each
// invalid sequence becomes U+FFFD, as json-writer.c quoted_str does.
func sanitize(b []byte) string {
	valid := true
	for _, c := range b {
		if c >= 0x80 || c == 0 {
			valid = false
			break
		}
	}
	if valid {
		return string(b)
	}
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); {
		cp, n := modUTF8(b[i:])
		if n == 0 {
			break // NUL ends a C string
		}
		if cp < 0 {
			cp = 0xFFFD
		}
		out = appendRune(out, cp)
		i += n
	}
	return string(out)
}
