package ForkServer::HTTPServer::UwsgiRequest;
use strict;
use warnings;

use ForkServer::Protocol qw(decode_header decode_dict HEADER_SIZE);

# nginx's uwsgi_modifier1 default (0), and uWSGI's PSGI plugin's (5)
my %MODIFIER1 = (0 => 1, 5 => 1);

=head1 NAME

ForkServer::HTTPServer::UwsgiRequest - a uwsgi request packet (what nginx's uwsgi_pass sends) as a PSGI environment

=head1 SYNOPSIS

  my ($env, $used) = ForkServer::HTTPServer::UwsgiRequest::parse($buffer);
  # undef: not all of the packet is there yet; dies (one line) on a bad one
  # $used: bytes of $buffer the packet took; the request body follows

=head1 DESCRIPTION

A uwsgi request is one packet: modifier1 (0, or uWSGI's 5 for PSGI), a
16-bit little-endian size, modifier2 (0), then the CGI variables as
16-bit-length-prefixed key/value pairs (F<docs/PROTOCOL.md>). nginx sends
them from its C<uwsgi_params>; the request body follows the packet,
C<CONTENT_LENGTH> bytes. The response is plain HTTP (status line, headers,
body) ended by closing the connection.

C<parse> turns the variables into the CGI part of a PSGI environment:
C<SCRIPT_NAME> empty, C<PATH_INFO> from C<PATH_INFO>, else the decoded path
of C<REQUEST_URI> (the front door sends no C<PATH_INFO>: nginx's
C<$document_uri> has its slashes merged, the request's own path has not),
a header sent twice joined with C<, >, C<HTTP_CONTENT_TYPE> and
C<HTTP_CONTENT_LENGTH> dropped, C<SERVER_PROTOCOL> defaulted to HTTP/1.0,
C<psgi.url_scheme> from C<HTTPS> or C<REQUEST_SCHEME>. The server adds the
rest (C<psgi.input>, C<psgi.errors>, ...). A packet whose variables are
malformed, or that lacks C<REQUEST_METHOD>, is an error.

=cut

sub parse {
    my ($buf) = @_;
    return undef if length $buf < HEADER_SIZE;
    my ($mod1, $size, $mod2) = decode_header(substr($buf, 0, HEADER_SIZE));
    die "uwsgi: modifier1 $mod1 is not a request (0 or 5)\n" unless $MODIFIER1{$mod1};
    return undef if length($buf) < HEADER_SIZE + $size;
    my @pairs = decode_dict(substr($buf, HEADER_SIZE, $size));
    my %env;
    while (my ($k, $v) = splice @pairs, 0, 2) {
        die "uwsgi: empty variable name\n" unless length $k;
        # a header given twice comes as two variables: joined, as an HTTP server does
        $env{$k} = defined $env{$k} && $k =~ /\AHTTP_/ ? "$env{$k}, $v" : $v;
    }
    # nginx passes every header, these two too; PSGI has them without HTTP_
    delete @env{qw(HTTP_CONTENT_TYPE HTTP_CONTENT_LENGTH)};
    die "uwsgi: no REQUEST_METHOD\n" unless defined $env{REQUEST_METHOD} && length $env{REQUEST_METHOD};
    my $uri = $env{REQUEST_URI} // '/';
    if (!defined $env{PATH_INFO}) {
        (my $path = $uri) =~ s/\?.*//s;
        $path =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge;
        $env{PATH_INFO} = $path;
    }
    $env{REQUEST_URI} = $uri;
    $env{QUERY_STRING} //= ($uri =~ /\?(.*)/s ? $1 : '');
    $env{SCRIPT_NAME} = '';
    $env{SERVER_PROTOCOL} //= 'HTTP/1.0';
    $env{SERVER_NAME} //= 'localhost';
    $env{SERVER_PORT} //= 0;
    for my $k (qw(CONTENT_LENGTH CONTENT_TYPE)) {
        delete $env{$k} if defined $env{$k} && !length $env{$k};    # nginx sends them empty
    }
    die "uwsgi: bad CONTENT_LENGTH '$env{CONTENT_LENGTH}'\n"
        if defined $env{CONTENT_LENGTH} && $env{CONTENT_LENGTH} !~ /\A[0-9]{1,15}\z/;
    my $https = lc($env{HTTPS} // '');
    $env{'psgi.url_scheme'} = ($https eq 'on' || $https eq '1') ? 'https'
                            : ($env{REQUEST_SCHEME} // '') eq 'https' ? 'https' : 'http';
    return (\%env, HEADER_SIZE + $size);
}

1;
