use strict;
use warnings;
use Test::More;
use File::Basename ();
use File::Copy ();
use File::Spec ();
use File::Temp ();
use JSON::PP ();
use ForkServer::Protocol qw(
    encode_packet decode_header decode_packet read_packet
    encode_array decode_array encode_dict decode_dict
);

sub dies_like(&$$) {
    my ($code, $re, $name) = @_;
    my $ok = eval { $code->(); 1 };
    ok(!$ok, "$name: dies") and like($@, $re, "$name: message");
    like($@, qr/\n\z/, "$name: one line") unless $ok;
}

subtest 'packet round trip' => sub {
    for my $body ('', 'x', "\0" x 300, 'a' x 65535) {
        my $bytes = encode_packet(35, 7, $body);
        is length $bytes, 4 + length $body, 'length';
        is_deeply [decode_packet($bytes)], [35, 7, $body], 'decoded ' . length($body) . ' bytes';
    }
    is encode_packet(35, 0, 'ab'), "\x23\x02\x00\x00ab", 'exact bytes: little-endian size';
    is_deeply [decode_header("\x73\x01\x01\x02")], [115, 257, 2], 'header: mod1, u16 LE size, mod2';
};

subtest 'array and dict round trips' => sub {
    my @argv = ('/usr/bin/perl', '--ini', 'app1.ini', '', "caf\xc3\xa9", 'z' x 65535);
    is_deeply [decode_array(encode_array(@argv))], \@argv, 'array';
    is_deeply [decode_array('')], [], 'empty array';
    is encode_array('ab', ''), "\x02\x00ab\x00\x00", 'array bytes';
    my @pairs = (pid => 1234, empty => '', k => 'v');
    is_deeply [decode_dict(encode_dict(@pairs))], \@pairs, 'dict keeps order';
    is encode_dict(pid => 42), "\x03\x00pid\x02\x0042", 'dict bytes';
};

subtest 'rejections' => sub {
    dies_like { decode_packet("\x23\x05") } qr/truncated/, 'short header';
    dies_like { decode_packet("\x23\x05\x00\x00abc") } qr/announces 5 body bytes, got 3/, 'short body';
    dies_like { decode_packet("\x23\x01\x00\x00abc") } qr/2 bytes of trailing garbage/, 'trailing garbage';
    dies_like { decode_array("\x05\x00ab") } qr/item 0: length 5 .* runs past the end/, 'item past end';
    dies_like { decode_array("\x01\x00a\x09\x00") } qr/item 1: length 9/, 'second item past end';
    dies_like { decode_array("\x01\x00a\x01") } qr/item 1: length field truncated/, 'half a length field';
    dies_like { decode_array("\xff\xff") } qr/length 65535/, 'huge length, empty rest';
    dies_like { decode_dict(encode_array('pid')) } qr/key 'pid' has no value/, 'dict key without value';
    dies_like { encode_packet(35, 0, 'a' x 65536) } qr/too long/, 'body over 65535';
    dies_like { encode_array('a' x 65536) } qr/too long/, 'item over 65535';
    dies_like { encode_array("\x{263a}") } qr/wide characters/, 'wide characters';
    dies_like { encode_packet(256, 0, '') } qr/out of range/, 'modifier over 255';
};

subtest 'read_packet from a handle' => sub {
    pipe(my $r, my $w) or die $!;
    syswrite $w, encode_packet(115, 0, "[uwsgi]\nenv = A=1\n") . "\x73\x09\x00\x00abc";
    close $w;
    is_deeply [read_packet($r)], [115, 0, "[uwsgi]\nenv = A=1\n"], 'whole packet';
    dies_like { read_packet($r) } qr/end of file after 3 of 9 bytes/, 'end of file in the body';
};

my $PROTOCOL_JSON = File::Spec->catfile(File::Basename::dirname($INC{'ForkServer/Protocol.pm'}), 'protocol.json');

sub declaration {
    my ($file) = @_;
    open my $fh, '<:raw', $file or die "$file: $!";
    return JSON::PP->new->canonical->decode(do { local $/; <$fh> });
}

subtest 'protocol.json: complete and well formed' => sub {
    my $decl = declaration($PROTOCOL_JSON);
    my @groups = grep { $_ ne 'about' } sort keys %$decl;
    is_deeply \@groups, [qw(emperor_bytes mask modifier1 packet vassal_bytes)], 'the groups';
    is_deeply $decl->{packet}, { HEADER_SIZE => 4, MAX_BODY => 65535 }, 'a 4-byte header, a 16-bit size';
    for my $group (qw(modifier1 mask vassal_bytes emperor_bytes)) {
        my @values = values %{ $decl->{$group} };
        ok @values && !grep({ !/\A\d+\z/ || $_ > 255 } @values), "$group: bytes";
        my %seen;
        ok !grep({ $seen{$_}++ } @values), "$group: no byte with two names";
    }
    my @masks = values %{ $decl->{mask} };
    ok !grep({ !$_ || ($_ & ($_ - 1)) } @masks), 'each mask a single bit';
};

subtest 'the module exports what protocol.json declares' => sub {
    my $decl = declaration($PROTOCOL_JSON);
    for my $group (grep { $_ ne 'about' } sort keys %$decl) {
        is_deeply [sort @{ $ForkServer::Protocol::EXPORT_TAGS{$group} // [] }], [sort keys %{ $decl->{$group} }],
            "tag :$group exports exactly the names of $group";
        for my $name (sort keys %{ $decl->{$group} }) {
            my $const = ForkServer::Protocol->can($name);
            is $const ? $const->() : undef, $decl->{$group}{$name}, "$name is $decl->{$group}{$name}";
        }
    }
};

subtest 'the bytes on the wire are uWSGI\'s' => sub {
    use ForkServer::Protocol qw(:all);
    is encode_packet(MODIFIER1_FORK_SERVER, MASK_PIPE | MASK_CONFIG, encode_array('psgi-vassal', '-s')),
        "\x23\x11\x00\x03\x0b\x00psgi-vassal\x02\x00-s", 'an adoption request';
    is encode_packet(MODIFIER1_CONFIG, 0, "[uwsgi]\n"), "\x73\x08\x00\x00[uwsgi]\n", 'a config packet';
    is_deeply [SPAWNED, CONFIG_AGAIN, ACCEPTING, LOYAL, DONE, HEARTBEAT], [1, 2, 5, 17, 22, 26], 'vassal bytes';
    is_deeply [STOP_NOW, RELOAD, STOP], [0, 1, 2], 'Emperor bytes';
};

subtest 'the values are read from protocol.json as the module loads' => sub {
    my $dir = File::Temp::tempdir(CLEANUP => 1);
    mkdir "$dir/ForkServer" or die $!;
    File::Copy::copy($INC{'ForkServer/Protocol.pm'}, "$dir/ForkServer/Protocol.pm") or die $!;
    my $decl = declaration($PROTOCOL_JSON);
    my $load = sub {
        my ($value) = @_;
        $decl->{vassal_bytes}{HEARTBEAT} = $value;
        open my $fh, '>:raw', "$dir/ForkServer/protocol.json" or die $!;
        print {$fh} JSON::PP->new->encode($decl);
        close $fh or die $!;
        my $out = qx{$^X -I$dir -MForkServer::Protocol=HEARTBEAT -e 'print HEARTBEAT' 2>&1};
        return ($?, $out);
    };
    is_deeply [$load->(27)], [0, '27'], 'a changed value is the one loaded';
    my ($status, $out) = $load->('twenty-six');
    ok $status, 'a broken value stops the load';
    like $out, qr{\A\Q$dir/ForkServer/protocol.json\E: vassal_bytes\.HEARTBEAT: not a non-negative integer$}m,
        'with the file, the name and the reason';
};

done_testing;
