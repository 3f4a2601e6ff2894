# A plain Plack app with the middleware its users reach for: Session,
# Deflater, ReverseProxy, Static.
use strict;
use warnings;
use File::Basename ();
use File::Spec ();
use Plack::Builder;
use Plack::Request;
use Plack::Session::Store::File;
use JSON::PP ();
use Digest::MD5 ();

my $here = File::Spec->rel2abs(File::Basename::dirname(__FILE__));
my $dir  = $ENV{FRAMEWORKS_STATE} // '/tmp';
mkdir "$dir/plack-sessions";

my $app = sub {
    my $req = Plack::Request->new(shift);
    my $path = $req->path_info;
    if ($path eq '/') {
        my $html = "<!DOCTYPE html>\n<html><body><h1>Hello from Plack</h1>\n" . ('<p>filler for the deflater</p>' x 40) . "\n</body></html>\n";
        return [200, ['Content-Type' => 'text/html; charset=utf-8'], [$html]];
    }
    if ($path eq '/json') {
        return [200, ['Content-Type' => 'application/json'],
            [JSON::PP->new->canonical->encode({ framework => 'plack', items => [1, 2, 3] })]];
    }
    if ($path eq '/upload' && $req->method eq 'POST') {
        my $up = $req->upload('file') or return [400, ['Content-Type' => 'text/plain'], ["no file\n"]];
        open my $fh, '<:raw', $up->path or die $!;
        my $data = do { local $/; <$fh> };
        return [200, ['Content-Type' => 'text/plain'], [sprintf "%s %d %s\n", $up->filename, length $data, Digest::MD5::md5_hex($data)]];
    }
    if ($path eq '/stream') {
        return sub {
            my $w = shift->([200, ['Content-Type' => 'text/plain']]);
            $w->write("chunk $_\n") for 1 .. 3;
            $w->close;
        };
    }
    if ($path eq '/session') {
        my $n = ++$req->env->{'psgix.session'}{count};
        return [200, ['Content-Type' => 'text/plain'], ["count $n\n"]];
    }
    if ($path eq '/redirect') {
        return [302, ['Location' => $req->base . 'json', 'Content-Type' => 'text/plain'], ["moved\n"]];
    }
    if ($path eq '/proxied') {
        return [200, ['Content-Type' => 'text/plain'], [join(' ', $req->address, $req->base, $req->scheme) . "\n"]];
    }
    die "the route died\n" if $path eq '/die';
    return [404, ['Content-Type' => 'text/plain'], ["not found\n"]];
};

builder {
    enable 'ReverseProxy';
    enable 'Deflater', content_type => ['text/html', 'text/plain', 'application/json'];
    enable 'Static', path => qr{^/static/}, root => $here;
    enable 'Session', store => Plack::Session::Store::File->new(dir => "$dir/plack-sessions");
    $app;
};
