# ForkServer::HTTPServer::Dechunk: an app's own chunk framing undone for an
# HTTP/1.0 client, whatever pieces the app writes it in.
use strict;
use warnings;
use Test::More;
use FindBin ();
use lib "$FindBin::Bin/../perl";
use ForkServer::HTTPServer::Dechunk ();

my $framed = "7\r\nchunk 1\r\n7;name=value\r\nchunk 2\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n";
my $data   = "chunk 1chunk 20123456789";

for my $size (1, 2, 3, 7, 64) {
    my $d = ForkServer::HTTPServer::Dechunk->new;
    my $out = '';
    for (my $i = 0; $i < length $framed; $i += $size) {
        $out .= $d->feed(substr $framed, $i, $size);
    }
    is $out, $data, "the data, fed $size bytes at a time";
    ok $d->done, 'the last chunk was seen';
    is $d->feed("more\r\n"), '', 'nothing after the last chunk';
}

my $d = ForkServer::HTTPServer::Dechunk->new;
is $d->feed("5\r\nhel"), 'hel', 'a chunk in parts: what is there';
is $d->feed("lo\r\n3\r\nabc"), 'loabc', 'then the rest and the next';
ok !$d->done, 'not done before the last chunk';

$d = ForkServer::HTTPServer::Dechunk->new;
is $d->feed("zz\r\nnot chunked"), "zz\r\nnot chunked", 'framing it cannot read passes as it is';
is $d->feed(' at all'), ' at all', 'and so does what follows';

$d = ForkServer::HTTPServer::Dechunk->new;
is $d->feed("3\r\nabcXY"), 'abcXY', 'a chunk without its CRLF: the rest as it is';
is $d->feed("tail"), "tail", 'and what follows';

done_testing;
