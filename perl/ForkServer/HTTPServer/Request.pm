package ForkServer::HTTPServer::Request;
use strict;
use warnings;

# Reading one request: the head (strict field lines, Host, version,
# keep-alive) and the body (framing, limits, Expect, chunked decoding into
# memory or a temporary file), each under its own deadline. The app and the
# response are ForkServer::HTTPServer::Response's.

use HTTP::Parser::XS qw(parse_http_request);
use ForkServer::HTTPServer::UwsgiRequest ();
# An in-memory open (an empty psgi.input, a buffered body) loads these on its
# first use. Loaded here, a worker never searches @INC while serving: not
# after the fork (an adopted vassal shares them with the base), and not
# after dropping privileges to a uid that may not read every @INC directory.
use PerlIO ();
use PerlIO::scalar ();
use ForkServer::HTTPServer::Wire qw(now write_all fill CRLF READ_CHUNK);
use ForkServer::HTTPServer::Worker qw(:msg);

# The PSGI keys that are the same in every request this server makes
# (ForkServer::Base::Warmup builds its synthetic request from them too).
my @CONSTANT_ENV = (
    'psgi.version'         => [1, 1],
    'psgi.errors'          => *STDERR,
    'psgi.url_scheme'      => 'http',
    'psgi.run_once'        => '',
    'psgi.multithread'     => '',
    'psgi.multiprocess'    => 1,
    'psgi.streaming'       => 1,
    'psgi.nonblocking'     => '',
    'psgix.input.buffered' => 1,
);

sub constant_env { return @CONSTANT_ENV }

# RFC 9112: a field line is a token, a colon, a value. Whitespace before the
# colon, obs-fold continuation lines and anything else are refused, so no
# proxy in front can read the head differently from us.
my $TOKEN = qr/[!#\$%&'*+.^_`|~0-9A-Za-z-]+/;
# compiled here, once in the base: a pattern built at the match would be
# compiled again by the first request of every worker
my $METHOD_RE = qr/\A$TOKEN\z/;
my $HEAD_RE = qr/\A[^\012]*\012(?:$TOKEN:[^\012]*\012)*\015?\012\z/;
# HTTP::Parser::XS's limit on field lines: past it a head is -1 (malformed).
use constant MAX_FIELD_LINES => 128;
# A field name with "_" becomes the same CGI name as its "-" twin
# (Transfer_Encoding -> HTTP_TRANSFER_ENCODING): such lines are dropped.
my $UNDERSCORE_FIELD = qr/\012[^:\012]*_[^:\012]*:[^\012]*/;
# RFC 3986 host [":" port]: an IP literal or a reg-name (no "@", "/",
# space...). Commas are refused before this (the parser joins repeats).
my $HOST_RE = qr/\A(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!\$&'()*+;=%]*)(?::[0-9]*)?\z/;

# A complete head may be in $c->{buf}: serve that one request. Returns
# 'partial' while the head is incomplete, 1 to keep the connection, 0 to
# close it; dies (ForkServer::client-gone) when the client vanished.
sub _serve_head {
    my ($self, $c) = @_;
    my $t0 = now();    # for the status's latency: from here, the head is complete
    my %env = (
        SCRIPT_NAME         => '',
        SERVER_NAME         => $self->{server_name},
        SERVER_PORT         => $self->{server_port},
        REMOTE_ADDR         => $c->{raddr},
        REMOTE_PORT         => $c->{rport},
        @CONSTANT_ENV,
        'psgix.harakiri'    => 1,
        'psgix.informational' => $c->{informational},
        'psgix.io'          => $c->{sock},
        'psgix.cleanup'     => 1,
        'psgix.cleanup.handlers' => [],
    );
    return $self->_serve_uwsgi_head($c, \%env, $t0) if $self->{protocol} eq 'uwsgi';
    my $hlen = parse_http_request($c->{buf}, \%env);
    return 'partial' if $hlen == -2 && length $c->{buf} <= $self->{max_header_size};
    $self->_head_ok($c, \%env, $hlen) or return 0;
    _real_ip($c, \%env);
    $self->_note_activity if $self->{idle} > 0;
    my $keep = $self->_keep_alive($c, \%env) // return 0;
    # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing; the
    # connection cannot be trusted past this message.
    $keep = 0 if defined $env{HTTP_TRANSFER_ENCODING} && $env{SERVER_PROTOCOL} eq 'HTTP/1.0';
    $env{'psgi.input'} = $self->_request_input($c, \%env) or return 0;

    $self->{requests}++;
    my $max_req = $self->{max_requests};
    $keep = 0 if ${ $self->{stopping_ref} } || ($max_req && $self->{requests} >= $max_req);
    return $self->_dispatch($c, \%env, $keep, $t0);
}

# A UNIX socket's peer has no address, and only who may open the socket file
# connects: the front door, which sets X-Real-IP to its client's address
# (overwriting the client's own). There, and only there, it is REMOTE_ADDR;
# over TCP the peer's address stays, whatever the header says.
my $IP_RE = qr/\A(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)\z/;

sub _real_ip {
    my ($c, $env) = @_;
    return if $c->{raddr} ne '' || !defined $env->{HTTP_X_REAL_IP};
    $env->{REMOTE_ADDR} = $env->{HTTP_X_REAL_IP} if $env->{HTTP_X_REAL_IP} =~ $IP_RE;
}

# `socket` (uwsgi_pass): the head is one uwsgi packet of CGI variables
# (ForkServer::HTTPServer::UwsgiRequest), the body CONTENT_LENGTH bytes after it, the
# response plain HTTP ended by the close (nginx reads it so).
sub _serve_uwsgi_head {
    my ($self, $c, $env, $t0) = @_;
    my ($vars, $used) = eval { ForkServer::HTTPServer::UwsgiRequest::parse($c->{buf}) };
    if (!defined $used) {
        if ($@) { $self->_log("uwsgi request: $@"); return 0 }
        return 'partial';
    }
    substr($c->{buf}, 0, $used, '');
    delete @$env{qw(REMOTE_ADDR REMOTE_PORT)};
    %$env = (%$env, %$vars);
    $env->{REMOTE_ADDR} //= '';
    # nginx sends the body whole, CONTENT_LENGTH long, whatever the client's framing
    delete $env->{HTTP_TRANSFER_ENCODING};
    $self->_note_activity if $self->{idle} > 0;
    $env->{'psgi.input'} = $self->_request_input($c, $env) or return 0;
    $self->{requests}++;
    return $self->_dispatch($c, $env, 0, $t0, 1);
}

# The head's size and shape; a bad one is answered (and false returned).
# A good one is taken out of the connection's buffer.
sub _head_ok {
    my ($self, $c, $env, $hlen) = @_;
    my $conn = $c->{sock};
    if ($hlen == -2) { $self->_error_response($conn, 431, undef, $c); return 0 }
    if ($hlen == -1) {
        # A well-formed request line in a version we do not speak: 505;
        # a complete head of more field lines than the parser takes: 431.
        my $status = $c->{buf} =~ m{\A$TOKEN [^ \015\012]+ HTTP/(\d+)\.(\d+)\015?\012} && $1 ne '1' ? 505
                   : _too_many_fields($c->{buf}) ? 431 : 400;
        $self->_error_response($conn, $status, undef, $c);
        return 0;
    }
    if ($hlen > $self->{max_header_size}) { $self->_error_response($conn, 431, $env, $c); return 0 }
    my $head = substr($c->{buf}, 0, $hlen, '');
    if ($head !~ $HEAD_RE || $env->{REQUEST_METHOD} !~ $METHOD_RE) {
        $self->_error_response($conn, 400, $env, $c); return 0;
    }
    # index first: "_" in a field name is rare, the regex runs only then
    _drop_underscore_fields($head, $env) if index($head, '_') >= 0 && $head =~ $UNDERSCORE_FIELD;
    # RFC 9112 3.2: origin-form, or absolute-form (its authority is the
    # host), or "*" for OPTIONS; anything else is 400.
    if (substr($env->{REQUEST_URI}, 0, 1) ne '/' && !_other_form($env)) {
        $self->_error_response($conn, 400, $env, $c); return 0;
    }
    return 1;
}

# More field lines than the parser takes in the head (up to its end, or
# all that has arrived of it)?
sub _too_many_fields {
    my $end = index($_[0], "\012\015\012");
    $end = index($_[0], "\012\012") if $end < 0;
    $end = length $_[0] if $end < 0;
    return (substr($_[0], 0, $end) =~ tr/\012//) > MAX_FIELD_LINES;
}

# Dropped, as nginx does (underscores_in_headers off), rather than refused:
# clients that send them mean no harm and get the request served; the
# head is parsed again without them, so that no CGI name (above all
# HTTP_TRANSFER_ENCODING and HTTP_CONTENT_LENGTH) takes a value from them.
sub _drop_underscore_fields {
    my ($head, $env) = @_;
    $head =~ s/$UNDERSCORE_FIELD(?=\012)//g;
    delete @$env{grep { /^HTTP_/ } keys %$env};
    delete @$env{qw(CONTENT_LENGTH CONTENT_TYPE)};
    parse_http_request($head, $env);
}

# A request target other than origin-form: absolute-form becomes
# origin-form with its authority as HTTP_HOST (RFC 9112 3.2.2: the Host
# field is ignored); "*" is kept for OPTIONS. False: refuse it.
sub _other_form {
    my $env = shift;
    my $uri = $env->{REQUEST_URI};
    return $env->{REQUEST_METHOD} eq 'OPTIONS' if $uri eq '*';
    # HTTP/1.1 must send Host even then (RFC 9112 3.2), though it is ignored
    return 0 if !defined $env->{HTTP_HOST} && $env->{SERVER_PROTOCOL} eq 'HTTP/1.1';
    my ($authority, $path) = $uri =~ m{\Ahttps?://([^/?#]+)([^#]*)\z}i or return 0;
    return 0 if $authority !~ $HOST_RE;
    $path = "/$path" if substr($path, 0, 1) ne '/';
    my ($p) = split /\?/, $path, 2;
    $p =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge;
    @$env{qw(HTTP_HOST REQUEST_URI PATH_INFO)} = ($authority, $path, $p);
    return 1;
}

# For `idle`: the master hears of requests at most once a second.
sub _note_activity {
    my $self = shift;
    my $t = time;
    return if $t == ($self->{last_note} // 0);
    worker_msg($self->{ready_w}, MSG_ACTIVITY);
    $self->{last_note} = $t;
}

# Keep the connection after this request (1 or 0)? undef: the head was
# refused (answered already).
sub _keep_alive {
    my ($self, $c, $env) = @_;
    my $proto = $env->{SERVER_PROTOCOL};
    my $connection = $env->{HTTP_CONNECTION};
    my $host = $env->{HTTP_HOST};
    my $keep;
    if ($proto eq 'HTTP/1.1') {
        $keep = !(defined $connection && $connection =~ /\bclose\b/i);
        # one valid Host, and only one (the parser joins repeats with ", ");
        # tr first: a plain name needs no regex (0.2 us a request)
        if (!defined $host || ($host =~ tr/a-zA-Z0-9.-//c && ($host =~ /,/ || $host !~ $HOST_RE))) {
            $self->_error_response($c->{sock}, 400, $env, $c); return undef;
        }
    } elsif ($proto eq 'HTTP/1.0') {
        $keep = defined $connection && $connection =~ /\bkeep-alive\b/i;
        if (defined $host && $host =~ tr/a-zA-Z0-9.-//c && ($host =~ /,/ || $host !~ $HOST_RE)) {
            $self->_error_response($c->{sock}, 400, $env, $c); return undef;
        }
    } else {
        $self->_error_response($c->{sock}, 505, $env, $c); return undef;
    }
    return $keep ? 1 : 0;
}

# psgi.input: the body read under its own deadline, or an empty handle.
sub _request_input {
    my ($self, $c, $env) = @_;
    my $te = $env->{HTTP_TRANSFER_ENCODING};
    my $cl = $env->{CONTENT_LENGTH};
    if (defined $te || (defined $cl && $cl ne '0')) {
        local $ForkServer::HTTPServer::Wire::DEADLINE = now() + $self->{body_timeout};
        local $ForkServer::HTTPServer::Wire::STALL = $self->{socket_timeout};
        return $self->_read_body($c, $env);
    }
    if (defined $env->{HTTP_EXPECT} && lc $env->{HTTP_EXPECT} ne '100-continue') {
        $self->_error_response($c->{sock}, 417, $env, $c); return undef;
    }
    open my $input, '<', \(my $empty = '');
    return $input;
}

# Body framing checks, then the body into memory or a temporary file as it
# arrives: no chunk is ever held whole, whatever size it announces.
sub _read_body {
    my ($self, $c, $env) = @_;
    my ($conn, $bufref) = ($c->{sock}, \$c->{buf});
    # a read that gave up on time (a stall past socket_timeout or the body
    # deadline) is the client's slowness: 408, not 400
    my $refuse = sub {
        my $status = $_[0] == 400 && $ForkServer::HTTPServer::Wire::TIMED_OUT ? 408 : $_[0];
        $self->_error_response($conn, $status, $env, $c); return undef;
    };
    $ForkServer::HTTPServer::Wire::TIMED_OUT = 0;
    my ($status, $chunked, $cl) = $self->_body_framing($env);
    return $refuse->($status) if $status;
    if (defined(my $expect = $env->{HTTP_EXPECT})) {
        return $refuse->(417) if lc $expect ne '100-continue';
        write_all($conn, "HTTP/1.1 100 Continue" . CRLF . CRLF)
            if $env->{SERVER_PROTOCOL} eq 'HTTP/1.1' && $$bufref eq '';
    }
    my $sink = { limit => $self->{body_buffer_size}, body => '', fh => undef };
    if ($chunked) {
        $status = _read_chunked($conn, $bufref, $env, $sink, $self->{max_body_size});
        return $refuse->($status) if $status;
    } else {
        _copy_body($conn, $bufref, $sink, $cl) or return $refuse->(400);
    }
    if (my $fh = $sink->{fh}) {
        $fh->flush;
        seek $fh, 0, 0;
        return $fh;
    }
    open my $in, '<', \$sink->{body};
    return $in;
}

# (refusal status or 0, chunked, content length)
sub _body_framing {
    my ($self, $env) = @_;
    my $te = $env->{HTTP_TRANSFER_ENCODING};
    my $cl = $env->{CONTENT_LENGTH};
    my $max = $self->{max_body_size};
    if (defined $te) {
        return 501 if $te !~ /^\s*chunked\s*$/i;
        # Both headers: a request-smuggling shape (RFC 9112 6.3): refuse.
        return 400 if defined $cl;
        return (0, 1);
    }
    return 400 if $cl !~ /^\d+$/;
    # past 2**50 the number is not a length we could ever read: refuse at
    # once (it used to wait for the read timeout)
    $cl =~ s/^0+(?=\d)//;
    return 413 if length $cl > 15 || ($max && $cl > $max);
    return (0, 0, $cl);
}

# The body goes to memory up to body_buffer_size, past it to an anonymous
# temporary file; either way psgi.input is a seekable handle.
sub _store {
    my ($sink, $data) = @_;
    if (my $fh = $sink->{fh}) { print $fh $data; return }
    $sink->{body} .= $data;
    return if length $sink->{body} <= $sink->{limit};
    open my $fh, '+>', undef or die "temporary file for request body: $!\n";
    binmode $fh;
    print $fh $sink->{body};
    $sink->{body} = '';
    $sink->{fh} = $fh;
}

# $left bytes of data: from the buffer first, then the socket in pieces.
sub _copy_body {
    my ($conn, $bufref, $sink, $left) = @_;
    my $take = substr($$bufref, 0, $left, '');
    _store($sink, $take);
    $left -= length $take;
    while ($left > 0) {
        my $piece = '';
        return 0 unless fill($conn, \$piece, $left < READ_CHUNK ? $left : READ_CHUNK);
        _store($sink, $piece);
        $left -= length $piece;
    }
    return 1;
}

# A chunked body into $sink; returns 0, or the status to refuse it with.
sub _read_chunked {
    my ($conn, $bufref, $env, $sink, $max) = @_;
    my $total = 0;
    while (1) {
        # chunk-size [; ext] CRLF
        my $line = _take_line($conn, $bufref, 4096) // return 400;
        $line =~ /^0*([0-9a-fA-F]+)[ \t]*(?:;[^\015\012]*)?\015?\012\z/ or return 400;
        my $hex = $1;
        # 12 hex digits are 256 TB: past that the size is an attack (and
        # past 16 it overflows); and no chunk may pass limit-post
        return 413 if length $hex > 12;
        my $size = hex $hex;
        last if $size == 0;
        $total += $size;
        return 413 if $max && $total > $max;
        _copy_body($conn, $bufref, $sink, $size) or return 400;
        while (length $$bufref < 2) { fill($conn, $bufref) or return 400 }
        substr($$bufref, 0, 2, '') eq CRLF or return 400;
    }
    # trailer fields up to an empty line; dropped
    while (1) {
        my $t = _take_line($conn, $bufref, 8192) // return 400;
        last if $t =~ /^\015?\012\z/;
    }
    $env->{CONTENT_LENGTH} = $total;
    delete $env->{HTTP_TRANSFER_ENCODING};
    return 0;
}

# One line (up to LF) out of the buffer, reading more as needed; undef
# when more than $max bytes arrive without one or the read fails.
sub _take_line {
    my ($conn, $bufref, $max) = @_;
    my $end;
    while (($end = index($$bufref, "\012")) < 0) {
        return undef if length $$bufref > $max || !fill($conn, $bufref);
    }
    return substr($$bufref, 0, $end + 1, '');
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Request - reading one request in a worker of L<ForkServer::HTTPServer>

=head1 DESCRIPTION

The methods of the server object that turn a connection's buffered bytes
into a PSGI environment: the head (431 past C<max_header_size>, 400 for a
malformed head, a missing, repeated or invalid C<Host> or a request
target that is not origin-form, absolute-form or C<*> for C<OPTIONS>; 431
past the parser's 128 field lines; 408 when the body stalls past
C<socket_timeout> or its deadline passes), 505 for another HTTP
version), keep-alive, and the body (501 for a transfer coding other than
chunked, 400 for both C<Content-Length> and C<Transfer-Encoding>, 413 past
C<max_body_size>, 417 for an unknown C<Expect>), in memory up to
C<body_buffer_size> and in an anonymous temporary file past it.

=head2 constant_env() -> LIST

The key/value pairs of the PSGI environment that every request gets.

=cut
