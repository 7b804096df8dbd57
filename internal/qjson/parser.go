// Package qjson is QEMU 7.2's JSON dialect: a streaming parser that
// behaves like qobject/json-lexer.c, json-streamer.c and json-parser.c
// together (single-quoted strings, keywords lexed as [a-z]+, modified
// UTF-8, the same limits, the same recovery after a lexical error and the
// same error texts), a one-shot Parse like qobject_from_json, and the
// member order of QEMU's QDict. The QMP monitor parses its input stream
// with it, keyval its JSON option arguments, and qapi prints objects in
// its order.
//
// Values are map[string]any for objects, []any for arrays, json.Number
// holding the token's text for numbers, string, bool, and nil for null.
//
// QEMU queues the tokens of a message and parses them once the braces and
// brackets balance. We parse incrementally instead and remember the first
// error; recursive descent stops at the first offending token, so the error
// is the same, and a message that has gone wrong costs no memory while the
// rest of it streams in.
package qjson

import "encoding/json"

// QEMU's limits (json-streamer.c, json-lexer.c).
const (
	MaxTokenSize  = 64 << 20 // bytes, one token and all tokens of a message
	MaxTokenCount = 2 << 20  // tokens in one message
	MaxNesting    = 1 << 10  // open braces plus brackets
)

// Options configure a Parser. The zero value is QEMU's limits, with
// U+0000 in strings returned as a NUL byte.
type Options struct {
	// TokenSize, TokenCount and Nesting bound a parser's memory; zero
	// means QEMU's limit (tests and fuzzing use small ones).
	TokenSize, TokenCount, Nesting int
	// ModifiedUTF8 returns U+0000 (written "\u0000" or as the bytes C0 80)
	// as C0 80, the bytes QEMU's QString holds and hands to C code as
	// part of a name, instead of as a NUL byte.
	ModifiedUTF8 bool
}

// Error is a parse error. Its text is QEMU's byte for byte, stray bytes
// included as QEMU prints them on the command line; QMP replies pass it
// through Printable, as QEMU's JSON writer does.
type Error struct{ msg string }

func (e *Error) Error() string { return e.msg }

func errorf(msg string) error { return &Error{msg: msg} }

// Parser splits a byte stream into JSON values. Each complete value, or
// each error, is passed to the emit function given to NewParser, exactly
// when QEMU's monitor would act on it. Errors are *Error values with
// QEMU's texts ("JSON parse error, expecting value").
// A Parser is not safe for concurrent use.
type Parser struct {
	emit func(v any, err error)
	opts Options

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
func NewParser(emit func(v any, err error), o Options) *Parser {
	if o.TokenSize <= 0 {
		o.TokenSize = MaxTokenSize
	}
	if o.TokenCount <= 0 {
		o.TokenCount = MaxTokenCount
	}
	if o.Nesting <= 0 {
		o.Nesting = MaxNesting
	}
	return &Parser{emit: emit, opts: o}
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
	room := p.opts.TokenSize - len(p.token)
	n := 0
	for n < len(b) && n < room && ok(b[n]) {
		n++
	}
	p.token = append(p.token, b[:n]...)
	return n
}

// Flush ends the input: a pending number or keyword is completed, an
// unterminated string is a stray token, and an incomplete value is
// reported as "JSON parse error, premature EOI". The QMP monitor never
// flushes (a partial request is dropped at disconnect); Parse does.
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

// Parse parses s as exactly one JSON value, like QEMU's qobject_from_json
// (used for JSON command-line arguments). The caller cuts s at a NUL byte
// where QEMU sees a C string.
func Parse(s string, o Options) (any, error) {
	var (
		result any
		got    bool
		perr   error
	)
	p := NewParser(func(v any, err error) {
		if got || perr != nil {
			if perr == nil {
				perr = errorf("Expecting at most one JSON value")
			}
			result = nil
			return
		}
		if err != nil {
			perr = err
			return
		}
		result, got = v, true
	}, o)
	p.Feed([]byte(s))
	p.Flush()
	if perr != nil {
		return nil, perr
	}
	if !got {
		return nil, errorf("Expecting a JSON value")
	}
	return result, nil
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
	if len(p.token) > p.opts.TokenSize {
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
		p.finish(nil, errorf("JSON parse error, stray '"+cString(text)+"'"))
		return
	}
	switch {
	case p.tokenSize+len(text)+1 > p.opts.TokenSize:
		p.finish(nil, errorf("JSON token size limit exceeded"))
		return
	case p.tokenCount+1 > p.opts.TokenCount:
		p.finish(nil, errorf("JSON token count limit exceeded"))
		return
	case p.bracket+p.brace > p.opts.Nesting:
		p.finish(nil, errorf("JSON nesting depth limit exceeded"))
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
			return string(b[:i])
		}
	}
	return string(b)
}

func parseError(msg string) error {
	// parse_error() formats into a 1024-byte buffer.
	if len(msg) > 1023 {
		msg = msg[:1023]
	}
	return errorf("JSON parse error, " + msg)
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
		s, err := parseString(text, p.opts.ModifiedUTF8)
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
