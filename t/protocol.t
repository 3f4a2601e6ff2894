use strict;
use warnings;
use Test::More;
use File::Basename ();
use File::Spec ();
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

subtest 'one vocabulary: protocol.json' => sub {
    my $file = File::Spec->catfile(File::Basename::dirname($INC{'ForkServer/Protocol.pm'}), 'protocol.json');
    open my $fh, '<', $file or die "$file: $!";
    my $decl = JSON::PP->new->decode(do { local $/; <$fh> });
    my @groups = grep { $_ ne 'about' } sort keys %$decl;
    is_deeply \@groups, [qw(emperor_bytes mask modifier1 packet vassal_bytes)], 'the groups';
    for my $group (@groups) {
        is_deeply [sort @{ $ForkServer::Protocol::EXPORT_TAGS{$group} // [] }], [sort keys %{ $decl->{$group} }],
            "tag :$group exports exactly the names of $group";
        for my $name (sort keys %{ $decl->{$group} }) {
            my $const = ForkServer::Protocol->can($name);
            is $const ? $const->() : undef, $decl->{$group}{$name}, "$name is $decl->{$group}{$name}";
        }
    }
};

done_testing;
