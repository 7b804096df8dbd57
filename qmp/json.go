package qmp

import "blockd/internal/qjson"

// Parser splits a QMP byte stream into requests with QEMU's JSON parser
// (internal/qjson), reporting each parse error as the GenericError QEMU's
// monitor sends for it. A Parser is not safe for concurrent use.
type Parser struct {
	p    *qjson.Parser
	emit func(v any, err error)
}

// NewParser returns a parser that calls emit for every message, exactly
// when QEMU's monitor would act on it. Errors are *Error values of class
// GenericError with QEMU's texts ("JSON parse error, expecting value").
func NewParser(emit func(v any, err error)) *Parser {
	p := &Parser{emit: emit}
	p.p = qjson.NewParser(p.deliver, qjson.Options{})
	return p
}

func (p *Parser) deliver(v any, err error) {
	if err != nil {
		err = parseError(err)
	}
	p.emit(v, err)
}

// SetEmit replaces the function called for every message.
func (p *Parser) SetEmit(emit func(v any, err error)) { p.emit = emit }

// Feed lexes and parses b. It may call emit any number of times.
func (p *Parser) Feed(b []byte) { p.p.Feed(b) }

// Flush ends the input (see qjson.Parser.Flush). The monitor never
// flushes: a partial request is dropped at disconnect.
func (p *Parser) Flush() { p.p.Flush() }

// ParseJSON parses s as exactly one JSON value, like QEMU's
// qobject_from_json, with errors as the monitor reports them.
func ParseJSON(s string) (any, error) {
	v, err := qjson.Parse(s, qjson.Options{})
	if err != nil {
		return nil, parseError(err)
	}
	return v, nil
}

// parseError is a parser error as QEMU's monitor replies with it: the
// text passes through the JSON writer, which prints bytes that are not
// valid (modified) UTF-8 as U+FFFD.
func parseError(err error) *Error {
	return &Error{Class: GenericError, Desc: qjson.Printable(err.Error())}
}
