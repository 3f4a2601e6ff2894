use strict;
use warnings;
use Test::More;
use ForkServer::Protocol qw(encode_packet encode_dict);
use ForkServer::HTTPServer::UwsgiRequest;

sub packet { encode_packet($_[0] // 0, 0, encode_dict(@{ $_[1] })) }

# what nginx's uwsgi_params send, and two headers
my @vars = (
    QUERY_STRING => 'a=1&b=%20', REQUEST_METHOD => 'POST', CONTENT_TYPE => 'text/plain',
    CONTENT_LENGTH => '5', REQUEST_URI => '/p%20q/r?a=1&b=%20', PATH_INFO => '/p q/r',
    DOCUMENT_ROOT => '/x', SERVER_PROTOCOL => 'HTTP/1.1', REQUEST_SCHEME => 'http', HTTPS => '',
    REMOTE_ADDR => '127.0.0.1', REMOTE_PORT => '4242', SERVER_PORT => '8080',
    SERVER_NAME => 'app1.localhost', HTTP_HOST => 'app1.localhost:8080', HTTP_X_A => 'b',
);

subtest 'a whole packet, then the body' => sub {
    my $buf = packet(0, \@vars) . 'hello';
    my ($env, $used) = ForkServer::HTTPServer::UwsgiRequest::parse($buf);
    is $used, length($buf) - 5, 'the packet, not the body';
    is $env->{REQUEST_METHOD}, 'POST';
    is $env->{PATH_INFO}, '/p q/r';
    is $env->{QUERY_STRING}, 'a=1&b=%20';
    is $env->{SCRIPT_NAME}, '';
    is $env->{CONTENT_LENGTH}, 5;
    is $env->{HTTP_HOST}, 'app1.localhost:8080';
    is $env->{'psgi.url_scheme'}, 'http';
    is $env->{SERVER_PORT}, 8080;
};

subtest 'incomplete: undef until all of it is there' => sub {
    my $buf = packet(5, \@vars);
    for my $n (0, 1, 3, 4, 10, length($buf) - 1) {
        is scalar(ForkServer::HTTPServer::UwsgiRequest::parse(substr $buf, 0, $n)), undef, "$n bytes";
    }
    ok ForkServer::HTTPServer::UwsgiRequest::parse($buf), 'modifier1 5 (uWSGI PSGI) too';
};

subtest 'defaults and https' => sub {
    my ($env) = ForkServer::HTTPServer::UwsgiRequest::parse(packet(0, [REQUEST_METHOD => 'GET',
        REQUEST_URI => '/a%2Fb?x', CONTENT_LENGTH => '', CONTENT_TYPE => '', HTTPS => 'on']));
    is $env->{PATH_INFO}, '/a/b', 'decoded path of REQUEST_URI';
    is $env->{QUERY_STRING}, 'x';
    ok !exists $env->{CONTENT_LENGTH} && !exists $env->{CONTENT_TYPE}, 'empty ones dropped';
    is $env->{SERVER_PROTOCOL}, 'HTTP/1.0';
    is $env->{'psgi.url_scheme'}, 'https';
};

subtest 'malformed packets: one line each' => sub {
    for my $case (
        [encode_packet(35, 0, encode_dict(REQUEST_METHOD => 'GET')), qr/modifier1 35 is not a request/],
        [packet(0, [REQUEST_URI => '/']), qr/no REQUEST_METHOD/],
        [packet(0, [REQUEST_METHOD => 'GET', CONTENT_LENGTH => '-1']), qr/bad CONTENT_LENGTH/],
        [encode_packet(0, 0, "\x05\x00abc"), qr/runs past the end/],
        [encode_packet(0, 0, encode_dict('' => 'x', REQUEST_METHOD => 'GET')), qr/empty variable name/],
    ) {
        my ($buf, $re) = @$case;
        ok !eval { ForkServer::HTTPServer::UwsgiRequest::parse($buf); 1 }, "refused: $re";
        like $@, qr/\A[^\n]*$re[^\n]*\n\z/, 'one line';
    }
};

done_testing;
