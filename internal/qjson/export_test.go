package qjson

// FeedByte feeds one byte without the fast paths of Feed.
func (p *Parser) FeedByte(c byte) { p.feedChar(c, false) }
