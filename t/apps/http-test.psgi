# The app behind t/http-*.t. Routes by path; /block waits on a file gate so
# tests synchronise on conditions, not on sleeps.
use strict;
use warnings;
use Digest::MD5 ();

sub {
    my $env = shift;
    my $path = $env->{PATH_INFO};
    my $q = $env->{QUERY_STRING} // '';
    my $dir = $ENV{HTTP_TEST_DIR} // "/tmp";
    if ($path eq '/target') {
        # what the server made of the request target and Host
        return [200, ['Content-Type' => 'text/plain'],
                [join ' ', map { "$_=" . ($env->{$_} // '') } qw(HTTP_HOST REQUEST_URI PATH_INFO QUERY_STRING HTTP_X_A)]];
    }
    if ($path eq '/pid') {
        return [200, ['Content-Type' => 'text/plain'], [$$]];
    }
    if ($path eq '/echo') {
        my $in = $env->{'psgi.input'};
        my $body = '';
        while ((my $n = $in->read(my $chunk, 65536)) > 0) { $body .= $chunk }
        seek $in, 0, 0;
        $in->read(my $again, 10);
        my $is_file = (defined fileno($in) && fileno($in) >= 0) ? 1 : 0;
        return [200, ['Content-Type' => 'text/plain'], [join ' ',
            'len=' . length($body), 'cl=' . ($env->{CONTENT_LENGTH} // ''),
            'md5=' . Digest::MD5::md5_hex($body), "file=$is_file",
            'buffered=' . ($env->{'psgix.input.buffered'} ? 1 : 0),
            'reread=' . ($again // '')]];
    }
    if ($path eq '/stream') {
        return sub {
            my $respond = shift;
            my $w = $respond->([200, ['Content-Type' => 'text/plain']]);
            $w->write("part$_;") for 1 .. 3;
            $w->close;
        };
    }
    if ($path eq '/delayed') {
        return sub { $_[0]->([200, ['Content-Type' => 'text/plain'], ["delayed $$"]]) };
    }
    if ($path eq '/block') {
        # /block?NAME: announce start, wait for NAME.go (up to 60 s)
        open my $fh, '>', "$dir/$q.started"; close $fh;
        my $until = time + 60;
        select(undef, undef, undef, 0.01) until -e "$dir/$q.go" || time > $until;
        return [200, ['Content-Type' => 'text/plain'], ["done $q $$"]];
    }
    if ($path eq '/spin') {
        # /spin?NAME: announce start, compute (no sleep) until NAME.go (up to 60 s)
        open my $fh, '>', "$dir/$q.started"; close $fh;
        my $until = time + 60;
        my $x = 0;
        until (-e "$dir/$q.go" || time > $until) { $x += $_ for 1 .. 10_000 }
        return [200, ['Content-Type' => 'text/plain'], ["done $q $$"]];
    }
    if ($path eq '/hang') {
        open my $fh, '>', "$dir/hang.started"; close $fh;
        sleep 1 while 1;
    }
    if ($path eq '/hang-hard') {
        # stands in for a worker stuck inside XS: SIGALRM cannot reach Perl
        require POSIX;
        POSIX::sigprocmask(POSIX::SIG_BLOCK(), POSIX::SigSet->new(POSIX::SIGALRM()));
        open my $fh, '>', "$dir/hang.started"; close $fh;
        select(undef, undef, undef, 0.05) while 1;
    }
    if ($path eq '/commit') {
        $env->{'psgix.harakiri.commit'} = 1;
        return [200, ['Content-Type' => 'text/plain'], ["bye $$"]];
    }
    if ($path eq '/info') {
        $env->{'psgix.informational'}->(103, [Link => '</a.css>; rel=preload']);
        return [200, ['Content-Type' => 'text/plain'], ['after hints']];
    }
    if ($path eq '/big') {
        # /big?BYTES: one body of that size
        return [200, ['Content-Type' => 'application/octet-stream'], ['x' x ($q || 1_000_000)]];
    }
    if ($path eq '/sleep') {
        # /sleep?NAME: announce start, sleep 2 s, say how long the sleep lasted
        require Time::HiRes;
        open my $fh, '>', "$dir/$q.started"; close $fh;
        my $t0 = Time::HiRes::time();
        sleep 2;
        return [200, ['Content-Type' => 'text/plain'], [sprintf 'slept %.2f', Time::HiRes::time() - $t0]];
    }
    if ($path eq '/die') {
        require POSIX;
        POSIX::_exit(3);
    }
    if ($path eq '/cleanup') {
        # /cleanup?NAME: NAME.cleaned appears once the response is out
        push @{ $env->{'psgix.cleanup.handlers'} }, sub {
            open my $fh, '>', "$dir/$q.tmp"; print $fh $_[0]{PATH_INFO}; close $fh;
            rename "$dir/$q.tmp", "$dir/$q.cleaned";    # whole, or not there
        } if $env->{'psgix.cleanup'};
        return [200, ['Content-Type' => 'text/plain'], ['cleanup=' . ($env->{'psgix.cleanup'} ? 1 : 0)]];
    }
    return [404, ['Content-Type' => 'text/plain'], ['not found']];
};
